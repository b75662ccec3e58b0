"""Checkpoints and --resume in one process (the 2-rank SIGKILL test is tests/test_resume_dist.py).

An interruption is simulated by raising right after the n-th checkpoint was written; the resumed
run must end bit-identical to an uninterrupted one (weights, EMA, metrics), with mixup and
random augmentations on so that a wrong random state or a wrong data position would show.
"""

import json
import shutil

import pytest
import torch

import gps_ds.engine as engine_mod
from gps_ds.checkpoint import CheckpointError, STATE_FILE, checkpoint_root, install_safe_loader, latest_tag
from gps_ds.cli import run
from gps_ds.config import validate_config
from gps_ds.delta import load_delta
from gps_ds.engine import Trainer


def raw_cfg(digits, out, **sets):
    raw = {
        "model": {"name": "test_vit", "img_size": 32, "num_classes": 10},
        "data": {"train": str(digits), "val": str(digits), "val_split": "test", "test": str(digits), "recipe": "digits", "image_size": 32, "workers": 0,
                 "steps_per_epoch": 4, "mixup": {"mixup_alpha": 0.8, "prob": 1.0}},
        "gps": {"k": 1, "loss": "supcon", "max_batches": 2},
        "train": {"method": "gps", "epochs": 2, "lr": 0.01, "optimizer": "adamw", "weight_decay": 0.05,
                  "ema_decay": 0.9},
        "deepspeed": {"train_micro_batch_size_per_gpu": 16},
        "tracking": {"enabled": False},
        "output": {"dir": str(out), "checkpoint_every_steps": 3},
    }
    for dotted, value in sets.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return raw


class Interrupted(BaseException):
    pass


def run_interrupted(cfg, after_checkpoints: int, monkeypatch):
    """Run until `after_checkpoints` checkpoints are on disk, then stop as a kill would."""
    original = engine_mod.Trainer._checkpoint
    calls = []

    def checkpoint_then_stop(self, state):
        original(self, state)
        calls.append(state)
        if len(calls) == after_checkpoints:
            raise Interrupted

    with monkeypatch.context() as m:
        m.setattr(engine_mod.Trainer, "_checkpoint", checkpoint_then_stop)
        with pytest.raises(Interrupted):
            Trainer(cfg, show_progress=False).run()
    return calls[-1]


def assert_same_delta(a, b):
    da, db = load_delta(a), load_delta(b)
    assert da.selected.keys() == db.selected.keys() and da.whole.keys() == db.whole.keys()
    for name in da.selected:
        assert torch.equal(da.selected[name][0], db.selected[name][0]), name
        assert torch.equal(da.selected[name][1], db.selected[name][1]), name
    for name in da.whole:
        assert torch.equal(da.whole[name], db.whole[name]), name


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    summary = Trainer(validate_config(raw_cfg(digits, out)), show_progress=False).run()
    return out, summary


@pytest.mark.parametrize("after, where", [(1, (0, 3, 3)), (2, (1, 0, 4))], ids=["mid-epoch", "epoch-end"])
def test_resume_equals_uninterrupted(digits, tmp_path, uninterrupted, monkeypatch, after, where):
    ref, ref_summary = uninterrupted
    out = tmp_path / "run"
    cfg = validate_config(raw_cfg(digits, out))
    stopped = run_interrupted(cfg, after, monkeypatch)
    assert (stopped.epoch, stopped.batch, stopped.step) == where
    assert not (out / "summary.json").exists()

    summary = Trainer(cfg, resume=True, show_progress=False).run()
    assert_same_delta(ref / "delta_last.safetensors", out / "delta_last.safetensors")
    assert_same_delta(ref / "delta_best.safetensors", out / "delta_best.safetensors")
    assert (out / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
    assert summary["test"] == ref_summary["test"] and summary["best_epoch"] == ref_summary["best_epoch"]


def test_resume_without_random_states_differs(digits, tmp_path, uninterrupted, monkeypatch):
    # Negative control: the comparison above can fail. Restoring no random state changes mixup.
    ref, _ = uninterrupted
    out = tmp_path / "run"
    cfg = validate_config(raw_cfg(digits, out))
    run_interrupted(cfg, 1, monkeypatch)
    monkeypatch.setattr(engine_mod, "restore_rng", lambda *a, **k: None)
    Trainer(cfg, resume=True, show_progress=False).run()
    with pytest.raises(AssertionError):
        assert_same_delta(ref / "delta_last.safetensors", out / "delta_last.safetensors")


def test_checkpoint_carries_the_selection_and_only_trained_tensors(uninterrupted):
    from gps_ds.selection.maskfile import load_mask

    out, _ = uninterrupted
    tag = latest_tag(out)
    assert tag == "step00000008"
    folder = checkpoint_root(out) / tag
    states = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=True)
    module = states["module"]
    selection, _ = load_mask(out / "mask.safetensors")
    for name, idx in selection.items():
        base = name.rsplit(".", 1)[0]
        assert torch.equal(module[f"{base}.gps_indices"].long(), idx.long())
        assert f"{base}.gps_values" in module
        assert name not in module  # the frozen base is rebuilt, not stored
    state = json.loads((folder / STATE_FILE).read_text())
    assert state["state"]["epoch"] == 2 and state["identity"]["world_size"] == 1
    assert len(state["state"]["history"]) == 2
    assert (folder / "rng_rank0.safetensors").is_file() and (folder / "ema.safetensors").is_file()
    # keep_checkpoints=2: only the last two tags stay.
    tags = sorted(p.name for p in checkpoint_root(out).iterdir() if p.is_dir())
    assert tags == ["step00000006", "step00000008"]


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_resume_refuses_another_world_size(digits, tmp_path, uninterrupted, capsys):
    out = copy_run(uninterrupted[0], tmp_path / "run")
    state_file = checkpoint_root(out) / latest_tag(out) / STATE_FILE
    state = json.loads(state_file.read_text())
    state["identity"]["world_size"] = 2
    state_file.write_text(json.dumps(state))
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(raw_cfg(digits, out)))
    assert run(["train", "--config", str(cfg_file), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot resume" in err and "world_size 2 in the checkpoint, 1 now" in err


def test_resume_refuses_another_selection(digits, tmp_path, uninterrupted, capsys):
    from gps_ds.selection.maskfile import load_mask, save_mask

    out = copy_run(uninterrupted[0], tmp_path / "run")
    selection, meta = load_mask(out / "mask.safetensors")
    other = {n: (idx + 1) % 64 for n, idx in selection.items()}  # every candidate of test_vit has 64 columns
    other_mask = tmp_path / "other.safetensors"
    save_mask(other_mask, other, k=int(meta["k"]), scheme=meta["scheme"], loss=meta["loss"], model=meta["model"],
              samples=int(meta["samples"]), fingerprint=meta["fingerprint"])
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(raw_cfg(digits, out, gps__mask=str(other_mask))))
    before = (out / "mask.safetensors").read_bytes()
    assert run(["train", "--config", str(cfg_file), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot resume" in err and "selection_sha256" in err
    assert (out / "mask.safetensors").read_bytes() == before  # the run's own mask is left alone


@pytest.mark.parametrize("sets, message", [
    ({"train__method": "bitfit"}, "method 'gps' in the checkpoint, 'bitfit' now"),
    ({"gps__mode": "masked"}, "mode 'sparse' in the checkpoint, 'masked' now"),
    ({"gps__k": 2}, "--resume: the run's mask has K=1, the config asks for gps.k=2"),
], ids=["method", "mode", "k"])
def test_resume_refuses_another_method_mode_or_k(digits, tmp_path, uninterrupted, capsys, sets, message):
    out = copy_run(uninterrupted[0], tmp_path / "run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".json"}
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(raw_cfg(digits, out, **sets)))
    assert run(["train", "--config", str(cfg_file), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err
    assert {p: p.read_bytes() for p in before} == before  # deltas, mask and checkpoints untouched


def test_masked_mode_resume_equals_uninterrupted(digits, tmp_path, monkeypatch):
    """Masked mode (dense weights, masked gradients): interrupted mid-epoch and resumed, the run
    ends bit-identical to an uninterrupted one."""
    sets = dict(gps__mode="masked", train__ema_decay=None)
    ref = tmp_path / "full"
    Trainer(validate_config(raw_cfg(digits, ref, **sets)), show_progress=False).run()
    out = tmp_path / "cut"
    cfg = validate_config(raw_cfg(digits, out, **sets))
    stopped = run_interrupted(cfg, 1, monkeypatch)
    assert (stopped.epoch, stopped.batch, stopped.step) == (0, 3, 3)
    states = torch.load(checkpoint_root(out) / latest_tag(out) / "mp_rank_00_model_states.pt", weights_only=True)
    assert not any(k.endswith("gps_indices") for k in states["module"])  # dense weights, not sparse modules
    Trainer(cfg, resume=True, show_progress=False).run()
    assert_same_delta(ref / "delta_best.safetensors", out / "delta_best.safetensors")
    assert_same_delta(ref / "delta_last.safetensors", out / "delta_last.safetensors")
    assert (out / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()


def test_resume_refuses_a_half_written_checkpoint(digits, tmp_path, uninterrupted, capsys):
    out = copy_run(uninterrupted[0], tmp_path / "run")
    (checkpoint_root(out) / latest_tag(out) / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        latest_tag(out)


def test_checkpoints_are_read_without_unpickling_code(uninterrupted, tmp_path):
    # A model-states file holding an arbitrary object is refused by the engine's loader.
    import pickle

    out = copy_run(uninterrupted[0], tmp_path / "run")
    path = checkpoint_root(out) / latest_tag(out) / "mp_rank_00_model_states.pt"
    states = torch.load(path, weights_only=True)
    states["payload"] = Interrupted  # any class: loading it would mean importing and calling code
    torch.save(states, path)

    class FakeEngine:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        checkpoint_engine = TorchCheckpointEngine()

    engine = FakeEngine()
    install_safe_loader(engine)
    with pytest.raises(CheckpointError, match="unreadable DeepSpeed checkpoint file .*Weights only load failed"):
        engine.checkpoint_engine.load(str(path))
    with pytest.raises(pickle.UnpicklingError):  # what the loader raised inside (weights_only=True refused it)
        torch.load(path, weights_only=True)


def test_loader_skip_next_winds_the_epoch_forward(digits):
    from gps_ds.config import DataConfig

    cfg = DataConfig(train=str(digits), recipe="digits", image_size=32, workers=0, steps_per_epoch=5)

    def loader():
        from gps_ds.data.loaders import make_train_loader

        lo = make_train_loader(cfg, 0, 1, batch_size_per_rank=4)
        lo.set_epoch(1)
        return lo

    full = list(loader())
    calls = []
    lo = loader()
    lo.skip_next(2, then=lambda: calls.append(len(calls)))
    tail = []
    for batch in lo:
        assert calls == [0]  # called once, before the first batch it yields
        tail.append(batch)
    assert len(tail) == 3
    for (xa, ya), (xb, yb) in zip(full[2:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="cannot skip 6 of 5"):
        loader().skip_next(6)


def test_checkpoints_fall_on_accumulation_boundaries(digits, tmp_path, monkeypatch):
    # 2 micro-batches per optimizer step: the first step ends after batch 2, not batch 1.
    raw = raw_cfg(digits, tmp_path / "run", output__checkpoint_every_steps=1)
    raw["deepspeed"]["gradient_accumulation_steps"] = 2
    raw["deepspeed"]["train_batch_size"] = 32
    stopped = run_interrupted(validate_config(raw), 1, monkeypatch)
    assert (stopped.epoch, stopped.batch, stopped.step) == (0, 2, 1)


@pytest.mark.parametrize("ds, message", [
    ({"train_micro_batch_size_per_gpu": 16, "train_batch_size": 48},
     "deepspeed.train_batch_size is 48 but train_micro_batch_size_per_gpu x gradient_accumulation_steps x ranks "
     "= 16 x 1 x 2 = 32"),
    ({"train_micro_batch_size_per_gpu": 0}, "deepspeed.train_micro_batch_size_per_gpu must be a positive integer"),
    ({"gradient_accumulation_steps": 1.5}, "deepspeed.gradient_accumulation_steps must be a positive integer"),
])
def test_inconsistent_batch_sizes_are_named(ds, message):
    from gps_ds.engine import deepspeed_config

    cfg = validate_config({"deepspeed": ds})
    with pytest.raises(ValueError) as err:
        deepspeed_config(cfg, world=2)
    assert message in str(err.value)
    assert deepspeed_config(validate_config({"deepspeed": {"train_micro_batch_size_per_gpu": 16,
                                                           "train_batch_size": 32}}), world=2)
