"""The demo's stages on a tiny budget (pre-train 1 epoch, fine-tune 1-2 epochs): the table has
every registered demo method, every run picks its epoch on validation, the learning rate of each
row is the grid's best on validation (recomputed here from the runs' own files), and the test
split is evaluated once, at the end."""

import json
from pathlib import Path

import numpy as np
import pytest

from gps_ds import demo

GRID = {"full": (1e-3,), "linear": (1e-2,), "bitfit": (1e-2,), "lora": (3e-3,), "gps": (3e-3, 3e-4)}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    rows = demo.run_demo(root, pretrain_epochs=1, epochs=2, grid=GRID, pretrain_steps=8)
    return root, rows


def ok(rows):
    return [r for r in rows if "error" not in r]


def test_no_method_failed(demo_run):
    _, rows = demo_run
    assert [r for r in rows if "error" in r] == []


def _indices(folder: Path, split: str) -> list[int]:
    """The digits' original indices, read from the shards' member names (key = index + stem)."""
    import tarfile

    out = set()
    for shard in sorted(folder.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            out |= {int(Path(m.name).name[:7]) for m in tar if m.isfile()}
    return sorted(out)


def test_few_label_split_is_disjoint_stratified_and_carved_from_training(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out = tmp_path / "d"
    demo.write_digits_few_label(out, train_per_class=4, val_per_class=2, test_size=0.5, seed=0)
    idx = {split: _indices(out, split) for split in ("train", "val", "test")}
    y = load_digits().target
    _, test = train_test_split(np.arange(len(y)), test_size=0.5, random_state=0, stratify=y)
    assert idx["test"] == sorted(test.tolist())  # the usual stratified half, untouched
    assert not set(idx["train"]) & set(idx["val"])
    assert not (set(idx["train"]) | set(idx["val"])) & set(idx["test"])  # carved from the training half
    assert np.bincount(y[idx["train"]], minlength=10).tolist() == [4] * 10
    assert np.bincount(y[idx["val"]], minlength=10).tolist() == [2] * 10


def test_table_has_every_method_and_selects_on_validation(demo_run):
    root, rows = demo_run
    methods = [r["method"] for r in rows]
    assert methods == demo.demo_methods()
    assert {"full", "linear", "bitfit", "gps"} <= set(methods)
    table = demo.format_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    for r, line in zip(rows, table[2:]):
        assert line.startswith(f"| {r['method']} |")
        if "error" in r:
            continue
        assert r["select_on"] == "val"
        run = Path(r["output"])
        summary = json.loads((run / "summary.json").read_text())
        assert summary["select_on"] == "val" and summary["val"]["top1"] == r["val"]
        assert summary["test"]["top1"] == r["top1"]
        # the test split is never looked at during training: only val metrics per epoch
        history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(history) == 2 and all("val_top1" in h and not any(k.startswith("test_") for k in h)
                                         for h in history)
        best = max(history, key=lambda h: h["val_top1"])  # first of equal values, as the trainer keeps
        assert summary["best_epoch"] == best["epoch"] and r["val"] == best["val_top1"]


def test_lr_is_the_grid_best_on_validation(demo_run):
    root, rows = demo_run
    for r in ok(rows):
        vals = []
        for lr in GRID[r["method"]]:
            s = json.loads((root / "stage2-digits" / r["method"] / f"lr{lr:g}" / "summary.json").read_text())
            vals.append((s["val"]["top1"], lr))
        assert r["grid_seconds"] == pytest.approx(sum(
            json.loads((root / "stage2-digits" / r["method"] / f"lr{lr:g}" / "summary.json").read_text())["seconds"]
            for lr in GRID[r["method"]]))
        best_val = max(v for v, _ in vals)
        assert r["lr"] == next(lr for v, lr in vals if v == best_val)
        assert [g["lr"] for g in r["grid"]] == list(GRID[r["method"]])


def test_shares_and_counts(demo_run):
    from gps_ds.models import create_model

    _, rows = demo_run
    model = create_model(demo.BACKBONE["name"], 10, img_size=demo.BACKBONE["img_size"],
                         kwargs=demo.BACKBONE["kwargs"])
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    backbone = sum(p.numel() for n, p in model.named_parameters() if n not in head)
    total = sum(p.numel() for p in model.parameters())
    by = {r["method"]: r for r in ok(rows)}
    assert by["full"]["trained"] == total
    assert by["linear"]["trained"] == 64 * 10 + 10
    for r in ok(rows):
        assert r["percent_of_backbone"] == pytest.approx(100.0 * r["trained"] / backbone)
    assert by["linear"]["trained"] < by["gps"]["trained"] < by["full"]["trained"]


def test_stage_one_is_cached_for_the_same_settings(demo_run, capsys):
    root, _ = demo_run
    ckpt = demo.pretrain(root, 1, 8)
    assert "using the cached MNIST backbone" in capsys.readouterr().out
    assert ckpt == root / "pretrained" / "vit_mnist.safetensors"
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    assert meta["settings"]["epochs"] == 1 and 0 <= meta["mnist_test_top1"] <= 100
