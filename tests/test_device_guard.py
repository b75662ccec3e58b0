"""The device guard (gps_ds/testing/device_guard.py): its rules on hand-made cases, then the
train / evaluate / checkpoint / resume / select / eval paths run through it (one process
in-process, two ranks under `deepspeed` with GPS_DS_DEVICE_GUARD=1). A device mix-up an
accelerator run would hit (a CPU tensor in a collective, a model left on the CPU, an input not
moved) fails these tests on a CPU-only machine."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from gps_ds import distributed as D
from gps_ds.testing.device_guard import ACCELERATOR, DeviceGuardError, device_guard, on_device


@pytest.fixture
def guard():
    """The guard around one test; a violation a caller swallowed still fails it."""
    with device_guard() as seen:
        yield seen
        assert not seen.list(), seen.list()


def test_tensors_get_a_logical_place(guard):
    dev = D.accelerator_device()
    assert dev == ACCELERATOR  # DeepSpeed's CPU accelerator is named cpu:0 under the guard
    host = torch.zeros(3)
    assert not on_device(host) and host.device == torch.device("cpu")
    moved = host.to(dev)
    assert moved is not host and on_device(moved) and not on_device(host) and moved.device == dev
    assert on_device(torch.ones(2, device=dev)) and not on_device(torch.ones(2, device="cpu"))
    assert on_device(moved * 2 + host) and on_device(torch.zeros_like(moved)) and not on_device(moved.cpu())
    assert on_device(moved.to(torch.float64)) and not on_device(torch.from_numpy(moved.cpu().numpy()))
    host += moved  # in place: the target stays where it is
    assert not on_device(host)
    # Parameters: Module.to (param.data = ...), nn.Parameter(x), deepcopy (EMA copies) follow.
    m = nn.Linear(3, 2)
    m.register_buffer("idx", torch.arange(2))
    assert not any(on_device(t) for t in (m.weight, m.bias, m.idx))
    m.to(dev)
    assert all(on_device(t) for t in (m.weight, m.bias, m.idx)) and m.weight.device == dev
    assert on_device(nn.Parameter(moved)) and not on_device(nn.Parameter(torch.zeros(1)))
    twin = copy.deepcopy(m)
    assert all(on_device(t) for t in (twin.weight, twin.bias, twin.idx))
    # Host values read back or written to files are no violation.
    assert isinstance(m(moved[:3].expand(4, 3)).sum().item(), float)


def test_a_module_on_the_host_or_a_host_input_is_refused():
    with device_guard() as seen:
        dev = D.accelerator_device()
        m = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        with pytest.raises(DeviceGuardError, match="Linear runs on the host: its parameter 'weight'"):
            m(torch.randn(2, 4).to(dev))  # gps-ds eval's bug: the inputs moved, the model not
        m.to(dev)
        with pytest.raises(DeviceGuardError, match=r"Linear got a host input \(argument 0: torch.float32 tensor of "
                                                   r"shape \(2, 4\)\)"):
            m(torch.randn(2, 4))
        assert m(torch.randn(2, 4).to(dev)).shape == (2, 2)
        assert len(seen.list()) == 2


def test_a_host_tensor_in_a_collective_is_refused_in_one_process_too():
    with device_guard():
        dev = D.accelerator_device()
        assert D.all_reduce_(torch.ones(2, device=dev)).tolist() == [1.0, 1.0]
        assert D.all_reduce_sum([1.0, 2.0], device=dev) == [1.0, 2.0] and D.all_true(True, device=dev)
        with pytest.raises(DeviceGuardError, match=r"all_reduce_: a host \(CPU\) torch.float64 tensor of shape \(3,\)"):
            D.all_reduce_(torch.zeros(3, dtype=torch.float64))
        with pytest.raises(DeviceGuardError, match="all_reduce_sum"):
            D.all_reduce_sum([1.0])  # evaluation's original bug: the default device is the CPU
    D.all_reduce_(torch.zeros(3))  # no guard, no check


def test_ops_of_gps_ds_mixing_host_and_device_are_refused_as_cuda_would():
    """Rules of CUDA's device check: a 0-dim host scalar may join a device op, nothing else."""
    from gps_ds.monitor import StepMonitor

    with device_guard():
        dev = D.accelerator_device()
        ok = StepMonitor(dev, 8)
        ok.add_loss(torch.tensor(0.5).to(dev), 0)
        assert ok.check().loss == 0.5
        bad = StepMonitor(torch.device("cpu"), 8)  # the monitor's sums left on the host
        with pytest.raises(DeviceGuardError, match=r"\(in gps_ds.monitor\) mixes a host torch.float64 tensor of shape \(\)"):
            bad.add_loss(torch.tensor(0.5).to(dev), 0)
        # Not from gps_ds code (this test module): not checked; a 0-dim host scalar is allowed anyway.
        assert on_device(torch.ones(2).to(dev) * torch.tensor(2.0))


def test_masked_mode_delta_reads_a_device_weight_with_a_cpu_selection(guard):
    """Masked mode keeps dense weights on the device and the selection on the CPU: extracting and
    writing back the selected entries must work there (torch.gather refused it on CUDA)."""
    from gps_ds.delta import extract_delta, scatter_selected

    dev = D.accelerator_device()
    m = nn.Linear(4, 3).to(dev)
    sel = {"weight": torch.tensor([[0, 2], [1, -1], [3, 0]])}
    idx, vals = extract_delta(m, [], sel).selected["weight"]
    w = m.weight.detach().cpu()
    assert torch.equal(vals.cpu(), torch.stack([torch.stack([w[0, 0], w[0, 2]]), torch.stack([w[1, 1], w[0, 0] * 0]),
                                                torch.stack([w[2, 3], w[2, 0]])]))
    back = scatter_selected(torch.zeros(3, 4).to(dev), idx, vals.cpu()).cpu()
    expected = torch.zeros(3, 4)
    for r, c in ((0, 0), (0, 2), (1, 1), (2, 3), (2, 0)):
        expected[r, c] = w[r, c]
    assert torch.equal(back, expected)


# --------------------------------------------------------------------------- the real paths


def _raw_cfg(data, out, **over):
    raw = {
        "model": {"name": "test_vit", "img_size": 32, "num_classes": 10},
        "data": {"train": str(data), "val": str(data), "val_split": "test", "test": str(data), "recipe": "digits",
                 "image_size": 32, "workers": 0, "steps_per_epoch": 2},
        "gps": {"k": 1, "loss": "supcon", "max_batches": 1},
        "train": {"method": "gps", "epochs": 2, "lr": 0.01, "optimizer": "adamw", "ema_decay": 0.9},
        "deepspeed": {"train_micro_batch_size_per_gpu": 16},
        "tracking": {"enabled": False},
        "output": {"dir": str(out)},
    }
    raw.update(over)
    return raw


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """The digits with a 64-image test split (every evaluation here is a device check, not a score)."""
    from gps_ds.data.datasets import write_digits

    out = tmp_path_factory.mktemp("dg") / "digits"
    write_digits(out, test_size=64, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def guarded_run(small_digits, tmp_path_factory):
    """One process: scoring at world size 1, training, evaluation (plain + EMA, on val), a
    checkpoint mid-epoch, a stop, --resume from it, the final test with the best delta loaded back."""
    import gps_ds.engine as engine_mod
    from gps_ds.config import validate_config

    out = tmp_path_factory.mktemp("dgrun") / "run"
    cfg = validate_config(_raw_cfg(small_digits, out))

    class Stop(BaseException):
        pass

    original = engine_mod.Trainer._checkpoint

    def checkpoint_then_stop(self, state):
        original(self, state)
        if state.epoch == 1 and state.batch == 0:  # after epoch 0's evaluation and checkpoint
            raise Stop

    with device_guard() as seen:
        engine_mod.Trainer._checkpoint = checkpoint_then_stop
        try:
            with pytest.raises(Stop):
                engine_mod.Trainer(cfg, show_progress=False).run()
        finally:
            engine_mod.Trainer._checkpoint = original
        summary = engine_mod.Trainer(cfg, resume=True, show_progress=False).run()
        problems = seen.list()
    return out, summary, problems


def test_trainer_train_eval_checkpoint_resume_under_the_guard(guarded_run):
    out, summary, problems = guarded_run
    assert problems == []
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1] and all("ema_val_top1" in h for h in history)
    assert summary["test"]["count"] == 64 and (out / "delta_best.safetensors").is_file()


def test_select_and_eval_cli_under_the_guard(guarded_run, small_digits, tmp_path, capsys, guard):
    from gps_ds.cli import run

    out, summary, _ = guarded_run
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(_raw_cfg(small_digits, tmp_path / "unused")))
    assert run(["select", "--config", str(cfg), "--out", str(tmp_path / "m.safetensors"), "--quiet"]) == 0
    assert run(["eval", "--config", str(cfg), "--delta", str(out / "delta_best.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # gps-ds eval of the best delta reproduces the trainer's final test (same 64 images).
    assert result["count"] == 64 and result["top1"] == pytest.approx(summary["test"]["top1"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_ranks_under_the_guard(small_digits, tmp_path, monkeypatch):
    """`deepspeed --num_gpus 2 launchers/train.py` with GPS_DS_DEVICE_GUARD=1: scoring under ZeRO
    (its collectives), ZeRO-2 training, evaluation reduced over ranks, the delta files.
    Checkpoints are left to the one-process test above (kept out of this one's way)."""
    from dist_launch import ROOT, cli_args, digits_trainer_settings, launch

    out = tmp_path / "run"
    sets = digits_trainer_settings(small_digits, out)
    sets.update({"data.steps_per_epoch": 2, "train.epochs": 1, "gps.k": 1, "gps.max_batches": 1,
                 "deepspeed.train_micro_batch_size_per_gpu": 8, "deepspeed.zero_optimization": {"stage": 2},
                 "output.checkpoints": False})
    monkeypatch.setenv("GPS_DS_DEVICE_GUARD", "1")
    log = tmp_path / "log.txt"
    launch(2, [str(ROOT / "launchers" / "train.py"), *cli_args(sets)], log)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["count"] == 64 and "device guard" not in log.read_text()
