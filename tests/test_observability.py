"""What a run records and says: the best delta reaches MLflow when written (a run that crashes
later keeps it), the start-up artifacts, throughput metrics; DeepSpeed's start-up chatter only
with --verbose."""

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from gps_ds.config import validate_config
from gps_ds.engine import Trainer

DS_CHATTER = ("Setting accelerator to CPU", "built successfully", "cpp_extension", "[INFO]", "[WARNING]")


def _gps_ds(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "GPS_DS_VERBOSE"}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "gps_ds.cli", *args], capture_output=True, text=True, env=e,
                          timeout=900)


def test_deepspeed_start_up_chatter_only_with_verbose(tmp_path):
    """`gps-ds eval` starts the process group (accelerator detection, the CPU op's build and load)
    before it finds the delta missing: by default the one error line is all it says."""
    missing = str(tmp_path / "missing.safetensors")
    quiet = _gps_ds("eval", "--delta", missing)
    assert quiet.returncode == 2
    assert quiet.stderr.splitlines() == [f"gps-ds eval: error: delta file not found: {missing}"], quiet.stderr
    assert quiet.stdout == ""
    loud = _gps_ds("eval", "--delta", missing, "--verbose")  # after the command, as launchers pass it
    assert loud.returncode == 2 and loud.stderr.splitlines()[-1].startswith("gps-ds eval: error:")
    assert loud.stdout == ""  # stdout is for results (--json) only
    assert "Setting accelerator to CPU" in loud.stderr and "built successfully" in loud.stderr
    env = _gps_ds("eval", "--delta", missing, env={"GPS_DS_VERBOSE": "1"})
    assert "Setting accelerator to CPU" in env.stderr
    count = _gps_ds("count", "--model", "test_vit", "--num-classes", "10")
    assert count.returncode == 0 and not any(c in count.stdout + count.stderr for c in DS_CHATTER)


def test_best_delta_and_run_files_reach_mlflow_before_a_crash(digits, tmp_path, monkeypatch):
    raw = {
        "model": {"name": "test_vit", "img_size": 32, "num_classes": 10},
        "data": {"train": str(digits), "val": str(digits), "val_split": "train", "test": str(digits),
                 "recipe": "digits", "image_size": 32, "workers": 0, "steps_per_epoch": 2},
        "gps": {"k": 1, "loss": "supcon", "max_batches": 1},
        "train": {"method": "gps", "epochs": 2, "lr": 0.01, "log_every": 1},
        "deepspeed": {"train_micro_batch_size_per_gpu": 32},
        "output": {"dir": str(tmp_path / "run"), "checkpoints": False},
    }
    cfg = validate_config(raw)
    best_writes = []
    real_keep = Trainer._keep_if_best

    def keep(self, epoch, metrics):
        real_keep(self, epoch, metrics)
        best = self.out / "delta_best.safetensors"
        best_writes.append(best.read_bytes() if best.exists() else None)

    def crash(self):
        raise RuntimeError("crash after training")

    monkeypatch.setattr(Trainer, "_keep_if_best", keep)
    monkeypatch.setattr(Trainer, "_final_test", crash)
    with pytest.raises(RuntimeError, match="crash after training"):
        Trainer(cfg, show_progress=False).run()
    marker = json.loads((tmp_path / "run" / "run.json").read_text())
    client = MlflowClient(marker["tracking_uri"])
    run = client.get_run(marker["run_id"])
    assert run.info.status == "FAILED"
    arts = {a.path for a in client.list_artifacts(marker["run_id"])}
    assert {"delta_best.safetensors", "config.json", "mask.safetensors", "run.json"} <= arts
    assert "delta_last.safetensors" not in arts  # logged at the end only: the crash came first
    got = client.download_artifacts(marker["run_id"], "delta_best.safetensors", str(tmp_path / "dl"))
    last_best = [b for b in best_writes if b is not None][-1]
    assert open(got, "rb").read() == last_best  # the best delta as last written
    # the data settings the run resolved from test_vit's pretrained_cfg (mean = std = 0.5, crop 0.95)
    assert marker["data"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.95, "interpolation": "bicubic"}
    for name in ("images_per_s", "step_seconds", "train_loss", "lr"):
        history = client.get_metric_history(marker["run_id"], name)
        assert sorted(m.step for m in history) == [1, 2, 3, 4], name  # every step (log_every=1)
        assert all(m.value > 0 for m in history), name
