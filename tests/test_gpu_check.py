"""scripts/gpu_check.sh: its CPU dry run goes through every step; usage errors and a missing GPU
stop it with one clear line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["env", "data", "train", "select", "eval", "checks", "kernels_tests", "kernels_bench", "bench_train"]


def _run(*args, timeout=60):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(Path.home())}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def test_usage_errors():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0  # parses
    proc = _run()
    assert proc.returncode == 2 and "usage: bash scripts/gpu_check.sh OUTDIR" in proc.stderr
    proc = _run("/tmp/x", "--fast")
    assert proc.returncode == 2 and "unknown option '--fast'" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the real check would run")
def test_gpu_mode_without_cuda_stops_at_once(tmp_path):
    proc = _run(tmp_path / "out")
    assert proc.returncode == 1
    assert "stopping: no usable device" in proc.stderr
    assert "CUDA is not available to torch" in (tmp_path / "out" / "env.log").read_text()
    assert (tmp_path / "out" / "summary.txt").read_text().startswith("env: FAILED")


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, "--cpu-dry-run", timeout=1200)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = summary.splitlines()
    assert [ln.split(":")[0] for ln in lines[:-1]] == STEPS and all(": ok," in ln for ln in lines[:-1]), summary
    checks = json.loads((out / "checks.json").read_text())
    assert checks["ok"] and checks["eval_top1"] == checks["train_test_top1"]
    train = json.loads((out / "train.json").read_text())
    assert train["method"] == "gps" and train["trainable"]["selected"] > 0
    assert any((out / "run" / "checkpoints").iterdir())
    bench = json.loads((out / "bench_train.json").read_text())
    assert set(bench["results"]) == {"gps-sparse", "full", "lora", "frozen"}
    kernels = json.loads((out / "kernels_bench.json").read_text())
    assert kernels["rows"] and all(max(r["rel_error"].values()) < 2e-2 for r in kernels["rows"])
    md = (out / "BENCHMARKS-gpu.md").read_text()
    assert "<!-- bench:kernels:cpu:b1 -->" in md and "<!-- bench:train:test_vit:b2:k1:cpu -->" in md
    # every gpu-marked test was collected and skipped cleanly (none ran, none failed)
    assert " skipped" in (out / "kernels_tests.out").read_text() and "failed" not in (out / "kernels_tests.out").read_text()
