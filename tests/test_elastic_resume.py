"""Elastic resume (issue #13, item 2): a checkpoint written at N ranks continues at M ranks.

* `tests/dist_scripts/elastic_check.py`: ZeRO-3, sparse mode, Adam; 3 steps at 2 ranks, checkpoint,
  then 3 more steps at 3 ranks from it; the delta equals one process running all 6 steps on the
  same global batches (tolerance below).
* The trainer: a 2-rank ZeRO-3 run's epoch-end checkpoint resumed by `launchers/train.py --resume`
  at 1 rank finishes the run; refusals (one line, exit 2) for a mid-epoch checkpoint, another
  global batch and ZeRO stage 0.

Tolerance: 1e-5 absolute, except the key part of attention's qkv bias. Ranks sum per-sample
gradients in another order; Adam turns the rounding noise of the key bias's gradient (exactly 0
in exact arithmetic: softmax is shift-invariant) into steps of up to lr = 1e-2, so that slice is
only checked to stay within the steps' bound.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from dist_launch import DEADLINE_S, ROOT, cli_args, digits_trainer_settings, launch

SCRIPT = ROOT / "tests" / "dist_scripts" / "elastic_check.py"
TRAIN = str(ROOT / "launchers" / "train.py")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(4 * DEADLINE_S)]


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


Z = _module("zero_init_check", ROOT / "tests" / "dist_scripts" / "zero_init_check.py")
E = _module("elastic_check", SCRIPT)


def _model(ckpt: Path):
    from gps_ds.models import create_model

    return create_model("test_vit", Z.CLASSES, img_size=Z.IMG, checkpoint=str(ckpt))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A weights file and a selection (one process scoring the fixed batches)."""
    from safetensors.torch import save_file

    from gps_ds.rules import classify
    from gps_ds.selection.pipeline import run_selection
    from test_zero_init_dist import write_checkpoint

    tmp = tmp_path_factory.mktemp("el")
    ckpt = write_checkpoint(tmp / "test_vit.safetensors", Z.CLASSES)
    model = _model(ckpt)
    sel = run_selection(model, classify(model), Z.global_batches(Z.SCORE_BATCHES, 11), scheme="gps", k=Z.K,
                        loss="ce").selection
    save_file({n: t.contiguous() for n, t in sel.items()}, str(tmp / "selection.safetensors"))
    return SimpleNamespace(tmp=tmp, ckpt=ckpt, selection=sel)


def reference_delta(files):
    from gps_ds.delta import extract_delta
    from gps_ds.methods import get_method
    from gps_ds.optim import build_optimizer
    from gps_ds.rules import classify

    model = _model(files.ckpt)
    prepared = get_method("gps").prepare(model, classify(model), files.selection, "sparse")
    opt = build_optimizer(model, SimpleNamespace(momentum=0.9, **E.TRAIN))
    for x, y in Z.global_batches(E.TOTAL, 22):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return extract_delta(model, prepared.whole, None, {})


def compare(got, ref, lr: float) -> float:
    assert set(got.selected) == set(ref.selected) and set(got.whole) == set(ref.whole)
    err = 0.0
    for n, (idx, vals) in ref.selected.items():
        assert torch.equal(got.selected[n][0].long(), idx.long()), n
        err = max(err, float((got.selected[n][1] - vals).abs().max()))
    for n, t in ref.whole.items():
        d = (got.whole[n] - t).abs()
        if n.endswith("attn.qkv.bias"):
            d = d.view(3, -1)
            assert float(d[1].max()) <= 2 * lr * E.TOTAL, n  # the key bias: bounded by the steps
            d = torch.cat([d[0], d[2]])
        err = max(err, float(d.max()))
    return err


def test_two_ranks_checkpoint_continues_at_three_ranks_like_one_process(files):
    from gps_ds.delta import load_delta

    run, out = files.tmp / "run", files.tmp / "res"
    common = ["--ckpt", str(files.ckpt), "--selection", str(files.tmp / "selection.safetensors"), "--run", str(run)]
    launch(2, [str(SCRIPT), "--phase", "first", "--first", "3", *common], files.tmp / "first.txt")
    assert (run / "checkpoints" / "step00000003" / "trainable_full.safetensors").is_file()
    launch(3, [str(SCRIPT), "--phase", "resume", "--out", str(out), *common], files.tmp / "resume.txt")
    report = json.loads((out / "report.json").read_text())
    assert report["world"] == 3 and report["resumed_at_step"] == 3 and len(report["losses"]) == 3
    assert report["loaded_max_abs_err"] == 0.0  # every rank's partitions set from the file
    ref = reference_delta(files)
    err = compare(load_delta(out / "delta.safetensors"), ref, E.TRAIN["lr"])
    assert err < 1e-5, err


# -- the trainer -----------------------------------------------------------------------------------

def _env():
    from dist_launch import clean_env

    return dict(clean_env(), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _train_one_rank(sets: dict, *extra: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "gps_ds.cli", "train", *cli_args(sets), "--resume", "--quiet", *extra],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=DEADLINE_S)


@pytest.fixture(scope="module")
def two_rank_run(digits, tmp_path_factory):
    """2 ranks, ZeRO-3, sparse: 2 epochs of 4 steps, a checkpoint every 3 steps and at each epoch end."""
    tmp = tmp_path_factory.mktemp("el_trainer")
    sets = digits_trainer_settings(digits, tmp / "run", **{
        "data.steps_per_epoch": 4, "gps.k": 2, "gps.loss": "ce", "gps.max_batches": 2, "train.epochs": 2,
        "deepspeed.train_micro_batch_size_per_gpu": 12, "deepspeed.zero_optimization.stage": 3,
        "output.checkpoint_every_steps": 3, "output.keep_checkpoints": 10})
    launch(2, [TRAIN, *cli_args(sets)], tmp / "log.txt")
    tags = sorted(p.name for p in (tmp / "run" / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step00000003", "step00000004", "step00000006", "step00000008"], tags
    return SimpleNamespace(tmp=tmp, sets=sets)


def _cut_at(run: SimpleNamespace, tag: str, dest: Path) -> dict:
    """The run as if it had been killed right after checkpoint `tag` (later checkpoints removed)."""
    shutil.copytree(run.tmp / "run", dest)
    for p in (dest / "checkpoints").iterdir():
        if p.is_dir() and p.name > tag:
            shutil.rmtree(p)
    (dest / "checkpoints" / "latest").write_text(tag)
    return dict(run.sets, **{"output.dir": str(dest), "deepspeed.train_micro_batch_size_per_gpu": 24})


def test_trainer_resumes_an_epoch_end_checkpoint_of_two_ranks_at_one_rank(two_rank_run, tmp_path):
    sets = _cut_at(two_rank_run, "step00000004", tmp_path / "cut")
    proc = _train_one_rank(sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "(epoch 1, batch 0, step 4)" in proc.stderr
    final = json.loads((tmp_path / "cut" / "checkpoints" / "step00000008" / "gps_state.json").read_text())
    assert final["state"]["epoch"] == 2 and final["state"]["step"] == 8  # epoch 1's 4 steps, at 1 rank
    assert final["identity"]["world_size"] == 1
    history = [json.loads(line)["epoch"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert history == [0, 1]
    assert (tmp_path / "cut" / "delta_last.safetensors").is_file()


@pytest.mark.parametrize("tag, change, message", [
    ("step00000003", {}, "it was taken at batch 3 of epoch 0"),
    ("step00000004", {"deepspeed.train_micro_batch_size_per_gpu": 12}, "the global batch was 24, it is 12 now"),
    ("step00000004", {"deepspeed.zero_optimization.stage": 0}, "ZeRO stage 0"),
])
def test_trainer_refuses_what_cannot_resume_exactly_at_another_world_size(two_rank_run, tmp_path, tag, change, message):
    sets = dict(_cut_at(two_rank_run, tag, tmp_path / "cut"), **change)
    proc = _train_one_rank(sets)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "world_size 2 in the checkpoint, 1 now" in last and message in last, last
    assert "Traceback" not in proc.stderr


def test_zero2_checkpoint_of_two_ranks_resumes_at_one_rank(digits, tmp_path):
    """ZeRO-2, sparse, AdamW with a decay and a no-decay group: the elastic state is written at
    every checkpoint (the first one failed, "exp_avg not found in optimizer state fragment",
    before elastic._relink_optimizer_state) and an epoch-end checkpoint resumes at 1 rank with the
    saved Adam state (a fresh state would make the first resumed steps full-size lr steps)."""
    from safetensors import safe_open

    sets = digits_trainer_settings(digits, tmp_path / "run", **{
        "data.steps_per_epoch": 2, "gps.k": 2, "gps.loss": "ce", "gps.max_batches": 2, "train.epochs": 2,
        "deepspeed.train_micro_batch_size_per_gpu": 12, "deepspeed.zero_optimization.stage": 2,
        "output.keep_checkpoints": 10})
    launch(2, [TRAIN, *cli_args(sets)], tmp_path / "log.txt")
    saved = tmp_path / "run" / "checkpoints" / "step00000002" / "trainable_full.safetensors"
    with safe_open(str(saved), "pt") as f:
        keys = list(f.keys())
        exp_avg = {k: f.get_tensor(k) for k in keys if k.startswith("exp_avg/")}
    assert any(k.endswith(".bias") for k in exp_avg) and any("gps_values" in k for k in exp_avg)
    assert all(float(t.abs().max()) > 0 for t in exp_avg.values() if t.numel() > 1), "Adam state was saved empty"
    cut = dict(sets, **{"deepspeed.train_micro_batch_size_per_gpu": 24})
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step00000004")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step00000002")
    proc = _train_one_rank(cut)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(epoch 1, batch 0, step 2)" in proc.stderr
    final = json.loads((tmp_path / "run" / "checkpoints" / "step00000004" / "gps_state.json").read_text())
    assert final["state"]["step"] == 4 and final["identity"]["world_size"] == 1
