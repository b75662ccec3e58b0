"""`gps-ds bench zero` on a tiny ViT at 1 and 2 CPU ranks: JSON shape, partitioned parameter bytes
against an independent count, the results-file section (two deepspeed launches, ~80 s on 2 busy
cores: marked slow), and user errors, which fail before any launch (fast)."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest
import torch.nn as nn

from gps_ds.cli import run

MODEL, IMG, CLASSES, K = "test_vit", 32, 10, 1
ARGS = ["--model", MODEL, "--img-size", str(IMG), "--num-classes", str(CLASSES), "--ranks", "1,2", "--batch", "2",
        "--steps", "2", "--k", str(K), "--timeout", "600"]



@pytest.fixture(scope="module")
def result(tmp_path_factory):
    md = tmp_path_factory.mktemp("bench_zero") / "BENCHMARKS.md"
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = run(["bench", "zero", *ARGS, "--json", "--write", str(md)])
    assert rc == 0
    out = buf.getvalue().strip().splitlines()
    assert len(out) == 1, "--json prints one line"
    return json.loads(out[0]), md


def _sparse_model_counts() -> tuple[int, int]:
    """Independent count of the sparse model: (parameter numel, parameter tensors).  Sparse mode
    keeps every original parameter and adds `gps_values` (rows, K) to every Linear/Conv2d but the head."""
    from gps_ds.models import create_model

    model = create_model(MODEL, CLASSES, img_size=IMG)
    numel = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and name != "head":
            numel += mod.weight.shape[0] * min(K, mod.weight[0].numel())
            tensors += 1
    return numel, tensors


@pytest.mark.slow
@pytest.mark.timeout(1300)
def test_json_shape(result):
    r, _ = result
    assert r["benchmark"] == "zero" and r["model"] == MODEL and r["ranks"] == [1, 2]
    assert r["batch_per_rank"] == 2 and r["zero_optimization"]["stage"] == 3
    assert r["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    for key in ("cpu", "cores", "torch", "load_average_before", "load_average_after"):
        assert key in r["machine"]
    assert [run_["world"] for run_ in r["runs"]] == [1, 2]
    for run_ in r["runs"]:
        per = run_["per_rank"]
        assert sorted(p["rank"] for p in per) == list(range(run_["world"]))
        assert run_["train_peak_bytes_max"] == max(p["train_peak_bytes"] for p in per) > 0
        assert run_["train_peak_bytes_mean"] == pytest.approx(sum(p["train_peak_bytes"] for p in per) / len(per))
        for p in per:
            assert p["train_peak_rss_bytes"] >= p["baseline_rss_bytes"] > 0
            assert len(p["step_s"]) == len(p["losses"]) == 2
            assert p["param_bytes"]["unpartitioned_tensors"] == 0  # persistence threshold 0: all partitioned
            s = p["state_bytes"]
            assert s["total"] == s["params"] + s["grads"] + s["optimizer"] > 0
        assert run_["ratio"]["local_param_bytes_max"] == pytest.approx(
            run_["local_param_bytes_max"] / r["runs"][0]["local_param_bytes_max"])


@pytest.mark.slow
@pytest.mark.timeout(1300)
def test_local_param_bytes_halve(result):
    r, _ = result
    numel, tensors = _sparse_model_counts()
    one, two = r["runs"]
    assert one["full_param_bytes"] == two["full_param_bytes"] == numel * 4
    assert one["local_param_bytes_max"] == numel * 4
    # ZeRO-3 pads every tensor's partition to ceil(numel / world): at most 4 bytes per tensor more.
    for p in two["per_rank"]:
        assert numel * 4 / 2 <= p["param_bytes"]["local"] <= numel * 4 / 2 + 4 * tensors
    assert two["ratio"]["local_param_bytes_max"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow
@pytest.mark.timeout(1300)
def test_trainable_state_splits(result):
    r, _ = result
    one, two = r["runs"]
    trainable = one["per_rank"][0]["trainable_params"]
    # fp32 partition + gradient partition + two AdamW moments, all of the trainable entries on 1 rank.
    assert one["state_bytes_max"] >= trainable * 4 * 4
    assert two["state_bytes_max"] < 0.6 * one["state_bytes_max"]


@pytest.mark.slow
@pytest.mark.timeout(1300)
def test_write_section(result):
    r, md = result
    text = md.read_text()
    assert text.count(f"<!-- bench:zero:{MODEL}:b2:k{K} -->") == 1
    assert "| ranks |" in text and "load average" in text and "stage3_param_persistence_threshold=0" in text
    assert "batch fixed per rank" in text and "**1/N check**" in text


@pytest.mark.parametrize("bad, message", [
    (["--ranks", "0"], "--ranks"),
    (["--ranks", "1,x"], "--ranks"),
    (["--model", "no_such_model_xyz"], "unknown model 'no_such_model_xyz'"),
    (["--steps", "0"], ">= 1"),
])
def test_user_errors_are_one_line(bad, message, capsys):
    args = ARGS + bad  # later options win
    assert run(["bench", "zero", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def _runs(full: int, setup: list[int], train: list[int]) -> dict:
    return {"runs": [{"world": n, "full_param_bytes": full, "setup_peak_bytes_max": s, "train_peak_bytes_max": t}
                     for n, s, t in zip((1, 2, 3), setup, train)]}


def test_scaling_check_against_hand_worked_peaks():
    """Hand-worked: W = 1200; shares 1200 / 600 / 400, so the share drops by 600 (1->2) and 200 (2->3).
    Setup peaks 100 + share: ratios exactly 1. Training peaks have 60 more fixed bytes at N > 1 (gather
    buffers): 1->2 drops 540 (0.90), 2->3 drops 200 (1.00), from 1 rank to 3: 740 / 800 = 0.925."""
    from gps_ds.bench.zero import scaling, scaling_line

    rows = scaling(_runs(1200, [1300, 700, 500], [1500, 960, 760]))
    got = {(r["peak"], r["from"], r["to"]): r for r in rows}
    assert got[("setup", 1, 2)]["ratio"] == pytest.approx(1.0) and got[("setup", 2, 3)]["ratio"] == pytest.approx(1.0)
    assert got[("training", 1, 2)]["ratio"] == pytest.approx(540 / 600)
    assert got[("training", 2, 3)]["ratio"] == pytest.approx(1.0)
    assert got[("training", 2, 3)]["from_first"] == pytest.approx(740 / 800)
    assert all(r["met"] for r in rows) and "-> **met**" in scaling_line(_runs(1200, [1300, 700, 500], [1500, 960, 760]))
    # A peak that does not shed the share (the old whole-model set-up) misses the goal.
    flat = scaling(_runs(1200, [1300, 1290, 1285], [1500, 960, 760]))
    assert not [r for r in flat if r["peak"] == "setup" and r["met"]]
    assert "-> **missed**" in scaling_line(_runs(1200, [1300, 1290, 1285], [1500, 960, 760]))
