"""`gps-ds fewshot`: every (method, k, seed) cell trained on its own k-per-class subset, rows equal
each run's summary, mean ± std equal a numpy computation, PNG written; resume skips finished cells
(and retrains only the missing one after an interruption); one-line user errors."""

import json

import numpy as np
import pytest

from gps_ds.cli import run
from gps_ds.config import validate_config
from gps_ds.data.fewshot import few_shot_selection
from gps_ds.data.shards import resolve
from gps_ds.fewshot_curves import RESULTS, run_fewshot


@pytest.fixture(scope="module")
def few_digits(tmp_path_factory):
    from gps_ds.demo import write_digits_few_label

    out = tmp_path_factory.mktemp("data") / "digits-few"
    write_digits_few_label(out, train_per_class=4, val_per_class=2, test_size=0.1, seed=0)
    return out


def raw_config(tmp_path, data):
    return {
        "model": {"name": "test_vit", "img_size": 32, "num_classes": 10},
        "data": {"train": str(data), "val": str(data), "test": str(data), "recipe": "digits", "image_size": 32,
                 "workers": 0},
        "gps": {"k": 1, "max_batches": 1},
        "train": {"method": "gps", "epochs": 1, "lr": 3e-3},
        "deepspeed": {"train_micro_batch_size_per_gpu": 8},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "fewshot-test"},
        "output": {"dir": str(tmp_path / "base"), "checkpoints": False},
    }


@pytest.fixture(scope="module")
def curves(few_digits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fewshot")
    (tmp / "cfg.json").write_text(json.dumps(raw_config(tmp, few_digits)))
    out = tmp / "fs"
    assert run(["fewshot", "--config", str(tmp / "cfg.json"), "--methods", "gps,linear", "--shots", "1,2",
                "--seeds", "0", "--lr", "linear=0.01", "--out", str(out), "--quiet"]) == 0
    return tmp, out


def test_cells_equal_their_runs(curves, few_digits):
    _, out = curves
    rows = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert [(r["method"], r["k"], r["seed"]) for r in rows] == [(m, k, s) for m in ("gps", "linear")
                                                                for k in (1, 2) for s in (0,)]
    urls = resolve(str(few_digits), "train").urls
    for r in rows:
        summary = json.loads((out / r["method"] / f"k{r['k']}-s{r['seed']}" / "summary.json").read_text())
        cfg = json.loads((out / r["method"] / f"k{r['k']}-s{r['seed']}" / "config.json").read_text())
        assert r["test"] == summary["test"]["top1"] and r["output"] == summary["output"]
        assert (cfg["data"]["few_shot"], cfg["data"]["seed"], cfg["train"]["seed"]) == (r["k"], r["seed"], r["seed"])
        assert cfg["train"]["method"] == r["method"] and cfg["train"]["lr"] == (0.01 if r["method"] == "linear" else 3e-3)
    # the subsets the cells train on: k per class, and the seed changes them
    subsets = {(k, s): sorted(key for shard in few_shot_selection(urls, k, s) for key in shard)
               for k in (1, 2) for s in (0, 1)}
    assert all(len(v) == 10 * k for (k, _), v in subsets.items())
    assert subsets[(1, 0)] != subsets[(1, 1)]


def fake_train(cfg):
    """A cell's summary without training: a test score that depends on method, k and seed."""
    score = {"gps": 60.0, "linear": 40.0}[cfg.train.method] + 5.0 * cfg.data.few_shot + 3.0 * cfg.data.seed ** 2
    return {"metric": "top1", "test": {"top1": score}, "val": None, "trainable": {"total": 1}, "seconds": 0.0,
            "output": cfg.output.dir}


def test_outputs_of_the_real_runs(curves):
    _, out = curves
    result = json.loads((out / "fewshot.json").read_text())
    assert [p["k"] for p in result["curves"]["gps"]] == [1, 2] and result["curves"]["gps"][0]["std"] == 0.0
    assert (out / "fewshot.png").stat().st_size > 1000
    assert len((out / "fewshot.md").read_text().splitlines()) == 2 + 2


def test_mean_std_equal_numpy(tmp_path, few_digits):
    base = validate_config(raw_config(tmp_path, few_digits))
    result = run_fewshot(base, tmp_path / "fs", ["gps", "linear"], [1, 4, 16], [0, 1, 2], log=lambda m: None,
                         train=fake_train)
    rows = [json.loads(line) for line in (tmp_path / "fs" / RESULTS).read_text().splitlines()]
    assert len(rows) == 2 * 3 * 3
    for m in ("gps", "linear"):
        assert [p["k"] for p in result["curves"][m]] == [1, 4, 16]
        for p in result["curves"][m]:
            vals = np.array([r["test"] for r in rows if r["method"] == m and r["k"] == p["k"]])
            assert p["n"] == 3 and p["mean"] == pytest.approx(vals.mean()) and p["std"] == pytest.approx(vals.std(ddof=1))
            assert p["std"] > 0
    assert (tmp_path / "fs" / "fewshot.png").stat().st_size > 1000


def test_resume_skips_finished_and_retrains_missing(curves, few_digits):
    tmp, out = curves
    base = validate_config(raw_config(tmp, few_digits))
    base.train.method = "gps"
    calls = []

    def refuse(cfg):
        calls.append(cfg.output.dir)
        raise AssertionError("a finished cell was trained again")

    lrs = {"linear": 0.01}
    before = json.loads((out / "fewshot.json").read_text())
    again = run_fewshot(base, out, ["gps", "linear"], [1, 2], [0], lrs, log=lambda m: None, train=refuse)
    assert calls == [] and again["curves"] == before["curves"]
    # an interrupted run: the last cell's line never written (and a torn line left behind)
    lines = (out / RESULTS).read_text().splitlines()
    (out / RESULTS).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    last = json.loads(lines[-1])

    def fake(cfg):
        calls.append((cfg.train.method, cfg.data.few_shot, cfg.data.seed))
        return {"metric": "top1", "test": {"top1": 50.0}, "val": {"top1": 40.0}, "trainable": {"total": 1},
                "seconds": 0.1, "output": cfg.output.dir}

    res = run_fewshot(base, out, ["gps", "linear"], [1, 2], [0], lrs, log=lambda m: None, train=fake)
    assert calls == [(last["method"], last["k"], last["seed"])]
    assert [r["test"] for r in res["runs"]][-1] == 50.0
    # a changed budget is a new cell: retrained
    calls.clear()
    base.train.epochs = 2
    run_fewshot(base, out, ["gps"], [1], [0], log=lambda m: None, train=fake)
    assert calls == [("gps", 1, 0)]


def test_user_errors(tmp_path, capsys, few_digits):
    (tmp_path / "cfg.json").write_text(json.dumps(raw_config(tmp_path, few_digits)))
    for args, msg in ((["--methods", "gps,nope"], "--methods"), (["--shots", "1,0"], "--shots"),
                      (["--lr", "full=0.1"], "--lr")):
        assert run(["fewshot", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "o"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
