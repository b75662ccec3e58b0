"""Checkpoints, --resume and rank failures with several CPU ranks (issue #4, items 4 and "faults").

* 2 ranks, ZeRO-3, sparse mode: an uninterrupted run; the same run SIGKILLed (the whole process
  group, as a lost node) after its first mid-epoch checkpoint, then resumed with the same
  command: both end with the same delta. The multi-rank selection equals a single-process
  scoring of the global batches; a resume at another world size is refused.
* 3 ranks started one by one (as srun does, no launcher to clean up): one rank is SIGKILLed
  mid-training and the other two exit with an error in bounded time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_launch import DEADLINE_S, ROOT, clean_env, cli_args, digits_trainer_settings, free_port, launch, nested

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * DEADLINE_S)]
TRAIN = str(ROOT / "launchers" / "train.py")


def settings(digits, out, **extra) -> dict:
    return digits_trainer_settings(digits, out, **{
        "data.steps_per_epoch": 30, "gps.k": 2, "gps.loss": "ce", "gps.max_batches": 4, "gps.mode": "sparse",
        "train.epochs": 2, "train.lr": 0.003, "deepspeed.train_micro_batch_size_per_gpu": 8,
        "deepspeed.zero_optimization.stage": 3, "deepspeed.zero_optimization.stage3_param_persistence_threshold": 0,
        "output.checkpoint_every_steps": 5, **extra})


def deepspeed_cmd(world: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
            "--master_port", str(free_port()), TRAIN, *args]


def env() -> dict:
    return dict(clean_env(), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                GPS_DS_COLLECTIVE_TIMEOUT="120")


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    """The uninterrupted run and the killed-then-resumed run, both at 2 ranks."""
    tmp = tmp_path_factory.mktemp("resume2")
    full, cut = tmp / "full", tmp / "cut"
    launch(2, [TRAIN, *cli_args(settings(digits, full))], tmp / "full.log")

    log = open(tmp / "cut.log", "w")
    proc = subprocess.Popen(deepspeed_cmd(2, cli_args(settings(digits, cut))), cwd=ROOT, env=env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: (cut / "checkpoints" / "latest").is_file(), proc, DEADLINE_S, "first checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)  # launcher and both ranks at once, mid-epoch
    proc.wait()
    log.close()
    killed_at = (cut / "checkpoints" / "latest").read_text()
    finished_before_kill = (cut / "summary.json").exists()

    launch(2, [TRAIN, *cli_args(settings(digits, cut)), "--resume"], tmp / "resume.log")
    return {"full": full, "cut": cut, "killed_at": killed_at, "finished_before_kill": finished_before_kill,
            "resume_log": (tmp / "resume.log").read_text(), "tmp": tmp}


def test_killed_run_resumes_to_the_uninterrupted_result(runs):
    from gps_ds.delta import load_delta

    assert not runs["finished_before_kill"]
    step = int(runs["killed_at"].removeprefix("step"))
    assert 5 <= step < 60  # 2 epochs x 30 steps: killed before the end
    assert "resuming from" in runs["resume_log"]
    a = load_delta(runs["full"] / "delta_last.safetensors")
    b = load_delta(runs["cut"] / "delta_last.safetensors")
    assert a.selected.keys() == b.selected.keys() and a.whole.keys() == b.whole.keys()
    for name, (idx, vals) in a.selected.items():
        assert torch.equal(idx, b.selected[name][0]), name
        diff = (vals - b.selected[name][1]).abs().max().item()
        assert torch.equal(vals, b.selected[name][1]), f"{name}: max |diff| {diff}"
    for name, t in a.whole.items():
        assert torch.equal(t, b.whole[name]), f"{name}: max |diff| {(t - b.whole[name]).abs().max().item()}"
    assert (runs["full"] / "metrics.jsonl").read_text() == (runs["cut"] / "metrics.jsonl").read_text()


def test_zero3_delta_holds_full_tensors(runs):
    from gps_ds.delta import load_delta
    from gps_ds.models import create_model

    shapes = {n: p.shape for n, p in create_model("test_vit", 10, img_size=32).named_parameters()}
    delta = load_delta(runs["full"] / "delta_last.safetensors")
    assert delta.whole and delta.selected
    for name, t in delta.whole.items():
        assert t.shape == shapes[name] and t.numel() > 0, name
    for name, (idx, vals) in delta.selected.items():
        assert idx.shape == vals.shape == (shapes[name][0], 2), name
        assert vals.abs().sum() > 0, name


def test_two_rank_selection_equals_one_process_scoring(runs, digits):
    # Reference: one process, no ZeRO, scoring the global batches (both ranks' micro-batches
    # side by side). Cross-entropy here: the SupCon views are drawn from each rank's random
    # state, which a test cannot replay (SupCon across ranks: tests/test_zero_scoring_dist.py).
    import itertools

    from gps_ds.config import validate_config
    from gps_ds.data.loaders import make_score_loader
    from gps_ds.models import create_model_from_config
    from gps_ds.rules import classify
    from gps_ds.selection.maskfile import load_mask
    from gps_ds.selection.pipeline import run_selection

    cfg = validate_config(nested(settings(digits, runs["tmp"] / "ref")))
    model = create_model_from_config(cfg)
    roles = classify(model, cfg.model.family, cfg.gps.rules)
    from gps_ds.data.transforms import resolve_data

    data = resolve_data(cfg.data, model)  # what the trainer's loaders read (the model's normalisation)
    per_rank = [list(itertools.islice(make_score_loader(data, r, 2, batch_size_per_rank=8, two_view=False),
                                      cfg.gps.max_batches)) for r in range(2)]
    global_batches = [(torch.cat([x0, x1]), torch.cat([y0, y1])) for (x0, y0), (x1, y1) in zip(*per_rank)]
    result = run_selection(model, roles, global_batches, scheme=cfg.gps.scheme, k=cfg.gps.k, loss="ce",
                           seed=cfg.gps.seed)
    mask, _ = load_mask(runs["full"] / "mask.safetensors")
    rows = same = 0
    for name, idx in result.selection.items():
        a, b = idx.long().sort(dim=1).values, mask[name].long().sort(dim=1).values
        rows += a.shape[0]
        same += int((a == b).all(dim=1).sum())
    assert rows > 0 and same / rows >= 0.999, f"{same}/{rows} rows agree"


def test_resume_at_another_world_size_is_refused(runs, tmp_path):
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(runs["cut"], cut, ignore=shutil.ignore_patterns("*.log"))
    sets = settings(Path(json.loads((runs["cut"] / "config.json").read_text())["data"]["train"]), cut)
    proc = subprocess.run([sys.executable, "-m", "gps_ds.cli", "train", *cli_args(sets), "--resume", "--quiet"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "cannot resume" in last and "world_size 2 in the checkpoint, 1 now" in last
    assert "Traceback" not in proc.stderr


def test_a_dead_rank_makes_the_others_exit(digits, tmp_path):
    # Three ranks started directly (no launcher that would kill the rest for us).
    out = tmp_path / "run"
    sets = settings(digits, out, **{"data.steps_per_epoch": 400, "train.epochs": 1,
                                    "deepspeed.zero_optimization.stage": 2, "gps.mode": "masked",
                                    "output.checkpoint_every_steps": 10})
    port = str(free_port())
    procs, logs = [], []
    for rank in range(3):
        logs.append(open(tmp_path / f"rank{rank}.log", "w"))
        e = dict(env(), RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, TRAIN, *cli_args(sets)], cwd=ROOT, env=e, stdout=logs[-1],
                                      stderr=subprocess.STDOUT, start_new_session=True))
    try:
        wait_for(lambda: (out / "checkpoints" / "latest").is_file(), procs[0], DEADLINE_S, "first checkpoint")
        procs[2].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        codes = [p.wait(timeout=300) for p in procs[:2]]
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in logs:
            f.close()
    assert all(c != 0 for c in codes), codes
    assert waited < 150, f"survivors took {waited:.0f} s to exit"
    assert not (out / "summary.json").exists()
    last = (tmp_path / "rank0.log").read_text().strip().splitlines()[-1]
    assert last.startswith("gps-ds train: error: lost contact with another rank at step"), last
    assert "continue with --resume" in last


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(digits, tmp_path):
    sets = settings(digits, tmp_path / "run", **{"train.method": "linear", "data.steps_per_epoch": 10,
                                                 "deepspeed.zero_optimization.stage": 2})
    (tmp_path / "cfg.json").write_text(json.dumps(nested(sets)))
    script = ROOT / "tests" / "dist_scripts" / "nan_one_rank.py"
    launch(2, [str(script), "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "res")],
           tmp_path / "log.txt")
    r0 = json.loads((tmp_path / "res-0.json").read_text())["stopped"]
    r1 = json.loads((tmp_path / "res-1.json").read_text())["stopped"]
    assert r1.startswith("loss is nan at step 3 (epoch 0)"), r1
    assert r0.startswith("loss is not finite on another rank at step 3 (epoch 0)"), r0


KILL_RANK1_DURING_SAVE = '''
import os, signal, sys, time, torch
real_save = torch.save
def save_then_die(obj, f, *args, **kwargs):
    path = str(getattr(f, "name", f))
    if os.environ.get("RANK") == "1" and "step00000002" in path:
        time.sleep(4)  # rank 0 is done with its own files by now
        real_save(obj, f, *args, **kwargs)
        f.flush()
        with open(path, "r+b") as fh:
            fh.truncate(500)
        os.kill(os.getpid(), signal.SIGKILL)  # rank 1 dies in the middle of its optimizer partition
    return real_save(obj, f, *args, **kwargs)
torch.save = save_then_die
from gps_ds.cli import launcher_main
launcher_main("train")
'''


def test_a_rank_killed_while_writing_a_checkpoint_leaves_latest_on_the_complete_one(digits, tmp_path):
    """ZeRO-1 (masked mode), 2 ranks, a checkpoint every step: rank 1 is SIGKILLed while it writes its optimizer
    partition of step 2, after rank 0 has written all of its files. `latest` must still name step 1
    (DeepSpeed's own pointer, written by rank 0 without waiting for the other ranks, named step 2)."""
    from gps_ds.checkpoint import checkpoint_root, latest_tag

    out = tmp_path / "run"
    script = tmp_path / "train_kill_rank1.py"
    script.write_text(KILL_RANK1_DURING_SAVE)
    sets = settings(digits, out, **{"data.steps_per_epoch": 4, "train.epochs": 1, "output.checkpoint_every_steps": 1,
                                    "deepspeed.zero_optimization.stage": 1, "gps.max_batches": 1,
                                    "gps.mode": "masked"})
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(script), *cli_args(sets)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=DEADLINE_S,
                          start_new_session=True)
    assert proc.returncode != 0, proc.stdout[-3000:]
    root = checkpoint_root(out)
    assert sorted(p.name for p in (root / "step00000002").iterdir())  # rank 0 wrote its part of step 2
    assert latest_tag(out) == "step00000001"
    for f in sorted((root / "step00000001").glob("*.pt")):  # every rank's file of step 1 is complete
        torch.load(f, weights_only=False)
