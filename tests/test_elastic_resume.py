"""Elastic resume (issue #13, item 4): a checkpoint written at N ranks continues at M ranks.

* `tests/dist_scripts/elastic_check.py`, sparse mode, Adam (a decay and a no-decay group), at ZeRO
  stages 3, 1 and 2 in the same two launches: 3 steps at 2 ranks, an epoch-end checkpoint, then 3
  more steps at 3 ranks from it; the delta, Adam's moments and step count equal one process
  running all 6 steps on the same global batches with torch's Adam (tolerances below).
* The trainer: a 2-rank ZeRO-3 run's epoch-end checkpoint resumed by `gps-ds train --resume` at 1
  rank (in this process) finishes the run; refusals (one line, exit 2) for a mid-epoch checkpoint,
  another global batch and ZeRO stage 0; a 2-rank ZeRO-2 AdamW run's checkpoints hold its Adam
  moments, and the 1-rank resume trains on the whole of the next epoch's stream from its start.

Tolerances. Trained values: 1e-5 absolute, except the key part of attention's qkv bias. Ranks sum
per-sample gradients in another order; Adam turns the rounding noise of the key bias's gradient
(exactly 0 in exact arithmetic: softmax is shift-invariant) into steps of up to lr = 1e-2, so that
slice is only checked to stay within the steps' bound. Adam moments: 1e-4 of the tensor's largest
entry (measured: under 1e-6; the key bias's noise moments are far below its q/v parts' entries).
A moment reset or taken from another rank's slice is off by O(1) of that scale. Right after the
load, every partition must equal the file exactly (it is copied, not computed).
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


@pytest.fixture(scope="module")
def reference(files):
    """One process, the ordinary model, torch's Adam: all `E.TOTAL` steps on the whole global batches
    (shared by the ZeRO-3 and the ZeRO 1/2 tests). The trained delta and, by parameter name, the
    optimizer state."""
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
    state = {n: opt.state[p] for n, p in model.named_parameters() if p.requires_grad}
    return SimpleNamespace(delta=extract_delta(model, prepared.whole, None, {}), state=state)


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


STAGES = (3, 1, 2)


@pytest.fixture(scope="module")
def elastic_runs(files):
    """One 2-rank launch (3 steps and an epoch-end checkpoint at each ZeRO stage in turn) and one
    3-rank launch resuming each; the reports by stage."""
    run, out = files.tmp / "run", files.tmp / "res"
    common = ["--ckpt", str(files.ckpt), "--selection", str(files.tmp / "selection.safetensors"), "--run", str(run),
              "--stages", ",".join(map(str, STAGES))]
    launch(2, [str(SCRIPT), "--phase", "first", "--first", "3", *common], files.tmp / "first.txt")
    launch(3, [str(SCRIPT), "--phase", "resume", "--out", str(out), *common], files.tmp / "resume.txt")
    reports = json.loads((out / "report.json").read_text())
    assert [r["stage"] for r in reports] == list(STAGES)
    return SimpleNamespace(run=run, out=out, reports={r["stage"]: r for r in reports})


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_checkpoint_continues_at_three_ranks_like_one_process(files, reference, elastic_runs, stage):
    """The delta, Adam's moments and step count after 3 steps at 2 ranks + 3 at 3 ranks from the
    epoch-end checkpoint equal one process's 6 steps (tolerances in the module docstring)."""
    from safetensors.torch import load_file

    from gps_ds.delta import load_delta
    from gps_ds.elastic import ELASTIC_FILE, read_meta

    report, out = elastic_runs.reports[stage], elastic_runs.out / f"stage{stage}"
    assert (elastic_runs.run / f"stage{stage}" / "checkpoints" / "step00000003" / ELASTIC_FILE).is_file()
    assert report["world"] == 3 and report["resumed_at_step"] == 3 and len(report["losses"]) == 3
    # every rank's working copy, fp32 master partitions and Adam state partitions set from the file
    assert report["loaded_max_abs_err"] == {"param": 0.0, "fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    err = compare(load_delta(out / "delta.safetensors"), reference.delta, E.TRAIN["lr"])
    assert err < 1e-5, err
    final = load_file(str(out / "final.safetensors"))
    assert set(final) == {f"{k}/{n}" for n in reference.state for k in ("param", "exp_avg", "exp_avg_sq")}
    for n, st in reference.state.items():
        assert float(st["step"]) == E.TOTAL
        for k in ("exp_avg", "exp_avg_sq"):
            rel = float((final[f"{k}/{n}"] - st[k]).abs().max() / st[k].abs().max().clamp_min(1e-30))
            assert rel < 1e-4, (n, k, rel)
    assert read_meta(out / "final.safetensors")["steps"] == [float(E.TOTAL)]  # every group's Adam step count


# -- the trainer -----------------------------------------------------------------------------------

def _train_one_rank(sets: dict, capfd) -> tuple[int, str]:
    """`gps-ds train --resume` at 1 rank in this process (no interpreter and DeepSpeed start per
    call): (exit code, stderr)."""
    from gps_ds.cli import run

    capfd.readouterr()
    code = run(["train", *cli_args(sets), "--resume", "--quiet"])
    return code, capfd.readouterr().err


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


def test_trainer_resumes_an_epoch_end_checkpoint_of_two_ranks_at_one_rank(two_rank_run, tmp_path, capfd):
    sets = _cut_at(two_rank_run, "step00000004", tmp_path / "cut")
    code, err = _train_one_rank(sets, capfd)
    assert code == 0, err[-3000:]
    assert "resuming from" in err and "(epoch 1, batch 0, step 4)" in err
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
def test_trainer_refuses_what_cannot_resume_exactly_at_another_world_size(two_rank_run, tmp_path, capfd, tag, change,
                                                                         message):
    sets = dict(_cut_at(two_rank_run, tag, tmp_path / "cut"), **change)
    code, err = _train_one_rank(sets, capfd)  # an exception would escape run() here
    assert code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "world_size 2 in the checkpoint, 1 now" in last and message in last, last
    assert "Traceback" not in err


def test_zero2_checkpoint_of_two_ranks_resumes_at_one_rank(digits, tmp_path, monkeypatch, capfd):
    """ZeRO-2, sparse, AdamW with a decay and a no-decay group: the elastic state is written at
    every checkpoint (the first one failed, "exp_avg not found in optimizer state fragment",
    before elastic._relink_optimizer_state) and an epoch-end checkpoint resumes at 1 rank (here in
    this process) with the saved Adam state (a fresh state would make the first resumed steps
    full-size lr steps). Its data stream: the whole of epoch 1 at 1 rank, from its first batch,
    as a fresh 1-rank loader yields it (digits has no random augmentation), so no sample of the
    epoch is repeated or skipped."""
    from safetensors import safe_open

    from dist_launch import nested
    from gps_ds.config import validate_config
    from gps_ds.data.loaders import Loader, make_train_loader
    from gps_ds.data.train_stream import TrainStream

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

    trained_on, raw = [], Loader.raw

    def recording(self):
        for batch in raw(self):
            if isinstance(self.dataset, TrainStream):
                trained_on.append(batch)
            yield batch

    monkeypatch.setattr(Loader, "raw", recording)
    code, err = _train_one_rank(cut, capfd)
    assert code == 0, err[-3000:]
    assert "(epoch 1, batch 0, step 2)" in err
    final = json.loads((tmp_path / "run" / "checkpoints" / "step00000004" / "gps_state.json").read_text())
    assert final["state"]["step"] == 4 and final["identity"]["world_size"] == 1
    monkeypatch.undo()
    fresh = make_train_loader(validate_config(nested(cut)).data, 0, 1, batch_size_per_rank=24)
    fresh.set_epoch(1)
    expected = list(fresh.raw())
    assert len(trained_on) == len(expected) == 2
    same = [torch.equal(x, x_ref) and torch.equal(y, y_ref) for (x, y), (x_ref, y_ref) in zip(trained_on, expected)]
    assert same == [True, True], "the resumed run's batches are not epoch 1's at 1 rank"
