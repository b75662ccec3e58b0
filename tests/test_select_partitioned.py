"""`deepspeed launchers/select.py` under ZeRO-3 with a weights file builds the model as the trainer
does (issue #13, item 1): inside deepspeed.zero.Init, each rank reading only its slices of the file.

Reference: `gps-ds select` in one process (timm loads the whole file, plain scoring) on the same
config. Cross-entropy scores summed over a whole epoch of the few-shot digits split (120 samples: 24
per step at 1 rank, 12 per rank at 2 ranks, none dropped) do not depend on how the samples are grouped
into batches, so both paths give the same per-row top-K (a `gps.max_batches` subset would differ).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from dist_launch import DEADLINE_S, ROOT, cli_args, launch, nested
from test_zero_init_dist import write_checkpoint

SELECT = str(ROOT / "launchers" / "select.py")
REPORT = re.compile(r"gps-ds: partitioned build, rank (\d+)/(\d+): holds (\d+) of (\d+) parameter entries "
                    r"\([\d.]+%\), read (\d+) from the weights file")


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    """(one-process mask, 2-rank ZeRO-3 mask, 2-rank log text)."""
    from gps_ds.cli import run

    root = tmp_path_factory.mktemp("selpart")
    # 1000 classes, as test_vit's pretrained_cfg: the file's head is kept, no parameter is freshly drawn
    # (a new head would be drawn by timm's init in one process, by nn.Linear's under zero.Init).
    ckpt = write_checkpoint(root / "test_vit.safetensors", 1000)
    sets = {"model.name": "test_vit", "model.img_size": 32, "model.num_classes": 1000, "model.checkpoint": str(ckpt),
            "data.train": str(digits), "data.few_shot": 12, "data.recipe": "digits", "data.image_size": 32,
            "data.workers": 0, "gps.k": 2, "gps.loss": "ce", "deepspeed.train_micro_batch_size_per_gpu": 24}
    cfg = root / "cfg.json"
    cfg.write_text(json.dumps(nested(sets)))
    one, two = root / "one.safetensors", root / "two.safetensors"
    assert run(["select", "--config", str(cfg), "--out", str(one), "--quiet"]) == 0
    launch(2, [SELECT, "--config", str(cfg), "--out", str(two), "--quiet", "--json",
               *cli_args({"deepspeed.train_micro_batch_size_per_gpu": 12, "deepspeed.zero_optimization.stage": 3})],
           root / "log.txt")
    return one, two, (root / "log.txt").read_text()


@pytest.mark.slow  # one 2-rank launch (the `runs` fixture) for both tests
@pytest.mark.timeout(DEADLINE_S + 120)
def test_zero3_select_mask_equals_one_process(runs):
    from gps_ds.selection.maskfile import load_mask

    (a, meta_a), (b, meta_b) = load_mask(runs[0]), load_mask(runs[1])
    assert int(meta_a["samples"]) == int(meta_b["samples"]) == 120  # 12 per class: 5 global batches, none dropped
    assert meta_a["fingerprint"] == meta_b["fingerprint"]  # shapes from the meta twin = the whole model's
    assert set(a) == set(b) and len(a) == 25
    for n in a:
        assert torch.equal(a[n], b[n]), n
    summary = json.loads([ln for ln in runs[2].splitlines() if ln.startswith('{"out"')][-1])
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3


@pytest.mark.slow  # one 2-rank launch (the `runs` fixture) for both tests
@pytest.mark.timeout(DEADLINE_S + 120)
def test_zero3_select_builds_partitioned(runs):
    """Each rank printed the load report: it holds its half and read about half of the file."""
    found = {int(m[1]): tuple(int(v) for v in m.groups()[1:]) for m in REPORT.finditer(runs[2])}
    assert sorted(found) == [0, 1], runs[2][-3000:]
    for world, local, total, read in found.values():
        assert world == 2 and total == 365_096
        assert local <= total / 2 + 200  # its half, padded
        assert read < 0.55 * total  # only the rows covering its half


def test_partitioned_build_keeps_the_pretrained_tag():
    """A tagged model (`model.pretrained: tv_in1k`) is built partitioned under the tag's pretrained_cfg,
    as the whole model is: the resolved normalisation (here crop_pct 0.875, not the untagged 0.95)."""
    from gps_ds.config import validate_config
    from gps_ds.data.transforms import resolve_data
    from gps_ds.models import create_model, create_model_from_config
    from gps_ds.zero_init import tagged_name

    cfg = validate_config({"model": {"name": "resnet50", "pretrained": "tv_in1k", "num_classes": 10},
                           "data": {"train": "/unused"}})
    whole = resolve_data(cfg.data, create_model_from_config(cfg, device="meta"))
    twin = resolve_data(cfg.data, create_model(tagged_name(cfg.model), 10, device="meta"))
    untagged = resolve_data(cfg.data, create_model("resnet50", 10, device="meta"))
    assert whole.crop_pct == 0.875 and untagged.crop_pct == 0.95
    assert twin == whole
