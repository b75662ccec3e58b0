"""Shared by the multi-rank tests: `deepspeed --num_gpus N ...` in a subprocess that can never hang."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 900  # the first DeepSpeed start compiles a shm op; CPU shared with other jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """os.environ without the rendezvous variables an in-process run of the trainer left behind
    (its process group still listens on that MASTER_PORT)."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def launch(world: int, args: list[str], log: Path, *, env_extra: dict[str, str] | None = None,
           check: bool = True) -> int:
    """Run `deepspeed --num_gpus world ARGS` with a deadline; the whole process group dies on timeout.
    A non-zero exit fails the test unless `check` is False; the exit status is returned."""
    env = dict(clean_env(), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               GPS_DS_COLLECTIVE_TIMEOUT="300", **(env_extra or {}))
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
           "--master_port", str(port), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"deepspeed --num_gpus {world} did not finish in {DEADLINE_S} s (hang?); log: {log}")
    if rc != 0 and check:
        pytest.fail(f"deepspeed --num_gpus {world} exited with {rc}:\n{log.read_text()[-4000:]}")
    left = shm_segments_of(port)
    assert not left, f"DeepSpeed shared-memory segments left in /dev/shm: {left}"
    return rc


def shm_segments_of(port: int) -> list[str]:
    """DeepSpeed CPU allreduce segments of the job on `port` still in /dev/shm."""
    shm = Path("/dev/shm")
    return sorted(p.name for p in shm.glob(f"deepspeed_allreduce_buffer_*_{port}_*")) if shm.is_dir() else []


def digits_trainer_settings(digits: Path, out: Path, **extra) -> dict:
    """`--set` keys of a small test_vit run on the digits shards (update with `extra`)."""
    sets = {"model.name": "test_vit", "model.img_size": 32, "model.num_classes": 10, "data.train": str(digits),
            "data.test": str(digits), "data.recipe": "digits", "data.image_size": 32, "data.workers": 0,
            "train.lr": 0.01, "train.optimizer": "adamw", "train.weight_decay": 0.05, "tracking.enabled": False,
            "output.dir": str(out)}
    sets.update(extra)
    return sets


def cli_args(sets: dict) -> list[str]:
    args = []
    for k, v in sets.items():
        args += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    return args


def nested(sets: dict) -> dict:
    """Dotted keys -> a config dict."""
    raw: dict = {}
    for dotted, v in sets.items():
        node = raw
        *path, last = dotted.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = v
    return raw
