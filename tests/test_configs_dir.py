"""Every shipped recipe in configs/ loads and validates (files pointed at need not exist yet), and
equals what configs/EXPECTED.md lists for it (parsed from the markdown), with its input
normalisation checked against the weights' own timm config."""

import json
import re
from pathlib import Path

import pytest

from gps_ds.config import validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.json"))
EXPECTED = ROOT / "configs" / "EXPECTED.md"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def expected_rows() -> dict[str, dict[str, str]]:
    """`configs/...json` -> {column: cell} from every table of EXPECTED.md that has a config column."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] | None = None
    for line in EXPECTED.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "config":
            header = cells
        elif header and not set(cells[0]) <= {"-"}:
            path = cells[0].strip("`")
            assert path not in rows, f"{path} listed twice in EXPECTED.md"
            rows[path] = dict(zip(header, cells))
    return rows


ROWS = expected_rows()


def rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def load(p: Path):
    return validate_config(json.loads(p.read_text()))


def is_listed_recipe(p: Path) -> bool:
    # demo.json is the demo's own config (tested below); the SAM polyp recipe belongs to the
    # segmentation work and is not a classification recipe with a paper top-1.
    return p.name != "demo.json" and not json.loads(p.read_text())["model"]["name"].startswith("sam")


def test_there_are_recipes():
    top = {p.name for p in CONFIGS if p.parent.name == "configs"}
    assert {"imagenet.json", "cifar100.json"} <= top
    assert len([p for p in CONFIGS if p.parent.name == "vtab"]) == 19
    assert len([p for p in CONFIGS if p.parent.name == "fgvc"]) == 5
    for arch in ("swin_base", "convnext_base"):
        names = {p.stem for p in CONFIGS if p.parent.name == arch}
        assert names == {"cub", "nabirds", "flowers", "dogs", "cars", "cifar100"}, arch


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(p.parents[1]).as_posix())
def test_recipe_validates(path):
    cfg = load(path)
    assert cfg.gps.k >= 1
    assert "train_micro_batch_size_per_gpu" in cfg.deepspeed


def test_every_recipe_is_listed_in_expected_md_and_nothing_else():
    recipes = {rel(p) for p in CONFIGS if is_listed_recipe(p)}
    assert recipes == set(ROWS), (sorted(recipes - set(ROWS)), sorted(set(ROWS) - recipes))


def _num(cell: str) -> float | None:
    return None if cell == "-" else float(cell)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_recipe_equals_expected_md(name):
    row, cfg = ROWS[name], load(ROOT / name)
    assert row["model.weights"] == f"{cfg.model.name}.{cfg.model.pretrained}"
    assert int(row["K"]) == cfg.gps.k
    assert float(row["lr"]) == cfg.train.lr
    assert int(row["batch"]) == cfg.deepspeed["train_micro_batch_size_per_gpu"]
    assert int(row["epochs"]) == cfg.train.epochs
    assert float(row["drop path"]) == cfg.model.drop_path_rate
    assert _num(row["EMA"]) == cfg.train.ema_decay
    mix = cfg.data.mixup
    got = "-" if not mix.mixing else f"{mix.mixup_alpha:g}/{mix.cutmix_alpha:g}/{mix.label_smoothing:g}"
    assert row["mixup/cutmix/smoothing"] == got
    # shared settings of every recipe ([S1] in EXPECTED.md)
    t = cfg.train
    assert (t.method, t.optimizer, t.weight_decay, t.warmup_epochs, t.warmup_lr, t.min_lr) == \
        ("gps", "adam", 0.0, 10, 1e-7, 1e-8)
    assert (cfg.gps.scheme, cfg.gps.loss, cfg.gps.temperature) == ("gps", "supcon", 0.07)
    number = row["paper GPS top-1 (%)"]
    assert number == "-" or 0 < float(number) <= 100
    norm = row["normalisation"].split(", crop ")
    assert cfg.data.mean == ((0.5,) * 3 if norm[0] == "0.5" else IMAGENET_MEAN)
    assert cfg.data.std == ((0.5,) * 3 if norm[0] == "0.5" else IMAGENET_STD)
    if cfg.data.recipe in ("fgvc", "imagenet"):
        assert len(norm) == 2 and float(norm[1]) == cfg.data.crop_pct


@pytest.mark.parametrize("name", sorted(ROWS))
def test_normalisation_is_the_weights_own(name):
    """Independent source: the pre-trained weights' own timm config ([W] in EXPECTED.md)."""
    import timm

    cfg = load(ROOT / name)
    pc = timm.models.get_pretrained_cfg(f"{cfg.model.name}.{cfg.model.pretrained}")
    assert pc is not None, name
    assert cfg.data.mean == pytest.approx(tuple(pc.mean)) and cfg.data.std == pytest.approx(tuple(pc.std))
    if cfg.data.recipe in ("fgvc", "imagenet"):
        assert cfg.data.crop_pct == pc.crop_pct


def test_fgvc_recipes_match_reference():
    # The paper's FGVC recipe (authors' scripts): lr and K per dataset; Table 9: GPS top-1.
    expect = {"cub": (3e-3, 2, 89.9), "nabirds": (1e-4, 20, 86.7), "flowers": (1e-3, 1, 99.7),
              "cars": (5e-4, 15, 90.4), "dogs": (1e-4, 1, 92.2)}
    for name, (lr, k, top1) in expect.items():
        cfg = load(ROOT / "configs" / "fgvc" / f"{name}.json")
        assert (cfg.train.lr, cfg.gps.k) == (lr, k), name
        assert float(ROWS[f"configs/fgvc/{name}.json"]["paper GPS top-1 (%)"]) == top1


def test_swin_and_convnext_recipes():
    # Table 9 (FGVC) and Table 10 (CIFAR-100) of the supplementary: GPS top-1 per architecture;
    # Table 7: K=5 on CIFAR-100 for both. FGVC hyper-parameters carried over from ViT-B/16.
    table9 = {"swin_base": {"cub": 90.8, "nabirds": 88.9, "flowers": 99.7, "dogs": 92.7, "cars": 90.7},
              "convnext_base": {"cub": 91.0, "nabirds": 89.6, "flowers": 99.7, "dogs": 93.7, "cars": 92.6}}
    table10 = {"swin_base": 93.55, "convnext_base": 93.58}
    names = {"swin_base": "swin_base_patch4_window7_224", "convnext_base": "convnext_base"}
    for arch, numbers in table9.items():
        for ds, top1 in numbers.items():
            cfg, vit = load(ROOT / "configs" / arch / f"{ds}.json"), load(ROOT / "configs" / "fgvc" / f"{ds}.json")
            assert cfg.model.name == names[arch]
            assert float(ROWS[f"configs/{arch}/{ds}.json"]["paper GPS top-1 (%)"]) == top1
            assert (cfg.gps.k, cfg.train.lr, cfg.deepspeed["train_micro_batch_size_per_gpu"]) == \
                (vit.gps.k, vit.train.lr, vit.deepspeed["train_micro_batch_size_per_gpu"])
            assert cfg.model.num_classes == vit.model.num_classes
        cifar = load(ROOT / "configs" / arch / "cifar100.json")
        assert (cifar.gps.k, cifar.model.num_classes) == (5, 100)
        assert float(ROWS[f"configs/{arch}/cifar100.json"]["paper GPS top-1 (%)"]) == table10[arch]


def test_sources_are_defined():
    text = EXPECTED.read_text()
    defined = set(re.findall(r"^\| (\[[A-Z]\d*\]) \|", text, flags=re.M))
    for name, row in ROWS.items():
        used = set(re.findall(r"\[[A-Z]\d*\]", row["hyper-parameters from"] + row["number from"]))
        assert used and used <= defined, (name, used - defined)


def test_readme_points_at_expected_md_not_shared_reference():
    readme = (ROOT / "README.md").read_text()
    assert "../shared/REFERENCE.md" not in readme
    assert "configs/EXPECTED.md" in readme


def test_demo_config_matches_the_demo_backbone():
    from gps_ds.demo import BACKBONE

    cfg = load(next(p for p in CONFIGS if p.name == "demo.json"))
    assert (cfg.model.name, cfg.model.img_size, cfg.model.kwargs) == (BACKBONE["name"], BACKBONE["img_size"], BACKBONE["kwargs"])
    from gps_ds.demo import FINETUNE_EPOCHS, LR_GRID

    # the demo's own stage-2 set-up: validation split, same epochs, a learning rate of the gps grid
    assert cfg.data.val is not None and cfg.data.image_size == BACKBONE["img_size"]
    assert cfg.train.epochs == FINETUNE_EPOCHS and cfg.train.lr in LR_GRID["gps"]
    assert cfg.model.checkpoint == "runs/demo/pretrained/vit_mnist.safetensors"
