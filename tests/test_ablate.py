"""`gps-ds ablate` end to end on a tiny config: one run per scheme (and per loss for the gradient
schemes), the table and JSON equal to each run's own summary.json, selections that differ, one
MLflow experiment, resume, and one-line user errors."""

import json
import sqlite3

import pytest
import torch

from gps_ds.ablate import plan
from gps_ds.cli import run
from gps_ds.selection.maskfile import load_mask

SCHEMES, LOSSES = "gps,random-neuron", "supcon,ce"


@pytest.fixture(scope="module")
def few_digits(tmp_path_factory):
    from gps_ds.demo import write_digits_few_label

    out = tmp_path_factory.mktemp("data") / "digits-few"
    write_digits_few_label(out, train_per_class=6, val_per_class=3, test_size=0.9, seed=0)
    return out


def write_config(tmp_path, data, **extra):
    raw = {
        "model": {"name": "test_vit", "img_size": 32, "num_classes": 10},
        "data": {"train": str(data), "val": str(data), "test": str(data), "recipe": "digits", "image_size": 32,
                 "workers": 0, "steps_per_epoch": 2},
        "gps": {"k": 1, "loss": "supcon", "max_batches": 2},
        "train": {"method": "gps", "epochs": 2, "lr": 3e-3},
        "deepspeed": {"train_micro_batch_size_per_gpu": 16},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "ablate-test"},
        "output": {"dir": str(tmp_path / "base"), "checkpoints": False},
    }
    for section, values in extra.items():
        raw[section].update(values)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def ablation(few_digits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate")
    cfg = write_config(tmp, few_digits)
    out = tmp / "abl"
    rc = run(["ablate", "--config", str(cfg), "--schemes", SCHEMES, "--losses", LOSSES, "--out", str(out),
              "--quiet"])
    assert rc == 0
    return tmp, cfg, out


def test_plan_crosses_losses_only_with_gradient_schemes():
    names = [r.name for r in plan(["gps", "random-neuron", "magnitude", "net"], ["supcon", "ce"])]
    assert names == ["gps-supcon", "gps-ce", "random-neuron", "magnitude", "net-supcon", "net-ce"]


def test_rows_equal_each_runs_summary(ablation):
    _, _, out = ablation
    result = json.loads((out / "ablation.json").read_text())
    assert [r["run"] for r in result["runs"]] == ["gps-supcon", "gps-ce", "random-neuron"]
    table = (out / "ablation.md").read_text().splitlines()
    assert len(table) == 2 + 3
    for r, line in zip(result["runs"], table[2:]):
        summary = json.loads((out / r["run"] / "summary.json").read_text())
        cfg = json.loads((out / r["run"] / "config.json").read_text())
        assert (cfg["gps"]["scheme"], cfg["train"]["method"], cfg["gps"]["k"]) == (r["scheme"], "gps", 1)
        if r["loss"] is not None:
            assert cfg["gps"]["loss"] == r["loss"]
        assert summary["select_on"] == "val" and r["select_on"] == "val"
        assert r["val"] == summary["val"]["top1"] and r["test"] == summary["test"]["top1"]
        assert r["selected"] == summary["trainable"]["selected"]
        # the selected count read independently from the run's mask file: K=1 entry per row
        selection, meta = load_mask(out / r["run"] / "mask.safetensors")
        assert meta["scheme"] == r["scheme"]
        assert r["selected"] == sum(int((idx >= 0).sum()) for idx in selection.values())
        assert r["selected"] == sum(idx.shape[0] for idx in selection.values())
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == r["scheme"] and cells[1] == (r["loss"] or "-")
        assert cells[2] == f"{r['selected']:,}"
        assert float(cells[4]) == pytest.approx(summary["val"]["top1"], abs=0.005)
        assert float(cells[5]) == pytest.approx(summary["test"]["top1"], abs=0.005)


def test_same_budget_different_selections(ablation):
    _, _, out = ablation
    masks = {name: load_mask(out / name / "mask.safetensors")[0] for name in ("gps-supcon", "gps-ce", "random-neuron")}
    sizes = {name: sum(t.numel() for t in m.values()) for name, m in masks.items()}
    assert len(set(sizes.values())) == 1, sizes  # same K, same budget
    names = list(masks["gps-supcon"])
    for a, b in (("gps-supcon", "random-neuron"), ("gps-ce", "random-neuron"), ("gps-supcon", "gps-ce")):
        differ = sum(int((masks[a][n] != masks[b][n]).any()) for n in names)
        assert differ > 0, (a, b)


def test_one_mlflow_experiment_one_run_each(ablation):
    tmp, _, out = ablation
    result = json.loads((out / "ablation.json").read_text())
    with sqlite3.connect(tmp / "mlflow.db") as db:
        rows = db.execute("SELECT r.run_uuid, r.name, r.status FROM runs r JOIN experiments e "
                          "ON r.experiment_id = e.experiment_id WHERE e.name = 'ablate-test'").fetchall()
    by_id = {rid: (name, status) for rid, name, status in rows}
    assert len(by_id) == 3
    for r in result["runs"]:
        assert by_id[r["run_id"]] == (f"ablate-{r['run']}", "FINISHED")


def test_resume_skips_finished_runs_and_reruns_changed_ones(ablation):
    tmp, cfg, out = ablation
    before = {r: (out / r / "summary.json").stat().st_mtime_ns for r in ("gps-supcon", "gps-ce", "random-neuron")}
    assert run(["ablate", "--config", str(cfg), "--schemes", SCHEMES, "--losses", LOSSES, "--out", str(out),
                "--quiet"]) == 0
    after = {r: (out / r / "summary.json").stat().st_mtime_ns for r in before}
    assert after == before
    # a different budget is a different run: not taken from the folder
    assert run(["ablate", "--config", str(cfg), "--set", "train.epochs=1", "--schemes", "random-neuron",
                "--out", str(out), "--quiet", "--json"]) == 0
    assert (out / "random-neuron" / "summary.json").stat().st_mtime_ns != before["random-neuron"]
    assert json.loads((out / "random-neuron" / "config.json").read_text())["train"]["epochs"] == 1


@pytest.mark.parametrize("argv, needle", [
    (["--schemes", "gps,bogus"], "--schemes: unknown value 'bogus'"),
    (["--losses", "mse"], "--losses: unknown value 'mse'"),
    (["--set", "train.method=full"], "train.method is 'full'"),
])
def test_user_errors_are_one_line(few_digits, tmp_path, capsys, argv, needle):
    cfg = write_config(tmp_path, few_digits)
    rc = run(["ablate", "--config", str(cfg), "--out", str(tmp_path / "abl"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "abl" / "ablation.json").exists()
