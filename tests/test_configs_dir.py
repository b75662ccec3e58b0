"""Every shipped recipe in configs/ loads and validates (files pointed at need not exist yet)."""

import json
from pathlib import Path

import pytest

from gps_ds.config import validate_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.json"))


def test_there_are_recipes():
    top = {p.name for p in CONFIGS if p.parent.name == "configs"}
    assert {"imagenet.json", "cifar100.json"} <= top
    assert len([p for p in CONFIGS if p.parent.name == "vtab"]) == 19
    assert len([p for p in CONFIGS if p.parent.name == "fgvc"]) == 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(p.parents[1]).as_posix())
def test_recipe_validates(path):
    cfg = validate_config(json.loads(path.read_text()))
    assert cfg.gps.k >= 1
    assert "train_micro_batch_size_per_gpu" in cfg.deepspeed


def test_fgvc_recipes_match_reference():
    # REFERENCE.md, "Training recipes": lr and K per FGVC dataset.
    expect = {"cub": (3e-3, 2), "nabirds": (1e-4, 20), "flowers": (1e-3, 1), "cars": (5e-4, 15), "dogs": (1e-4, 1)}
    fgvc = {p.stem: p for p in CONFIGS if p.parent.name == "fgvc"}
    for name, (lr, k) in expect.items():
        cfg = validate_config(json.loads(fgvc[name].read_text()))
        assert (cfg.train.lr, cfg.gps.k) == (lr, k), name


def test_demo_config_matches_the_demo_backbone():
    from gps_ds.demo import BACKBONE

    cfg = validate_config(json.loads(next(p for p in CONFIGS if p.name == "demo.json").read_text()))
    assert (cfg.model.name, cfg.model.img_size, cfg.model.kwargs) == (BACKBONE["name"], BACKBONE["img_size"], BACKBONE["kwargs"])
