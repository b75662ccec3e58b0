"""gps_ds.memory_limits against hand-made cgroup files, and the one-line out-of-memory report."""

from __future__ import annotations

import pytest
import torch

from gps_ds import memory_limits as ml
from gps_ds.cli import out_of_memory_line


def _tree(tmp_path, proc: str, files: dict[str, str]):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cgroup").write_text(proc)
    for rel, text in files.items():
        f = tmp_path / "fs" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return str(tmp_path / "cgroup"), str(tmp_path / "fs")


def test_cgroup_v1_headroom_is_limit_minus_usage(tmp_path):
    proc, root = _tree(tmp_path, "4:memory:/job/rank0\n3:cpu:/\n", {
        "memory/job/rank0/memory.limit_in_bytes": str(500 * 2**20),
        "memory/job/rank0/memory.usage_in_bytes": str(120 * 2**20)})
    assert ml.cgroup_headroom(proc, root) == 380 * 2**20


def test_cgroup_v2_headroom_and_no_limit(tmp_path):
    proc, root = _tree(tmp_path, "0::/slurm/job7\n", {
        "slurm/job7/memory.max": str(2**30), "slurm/job7/memory.current": str(2**28)})
    assert ml.cgroup_headroom(proc, root) == 3 * 2**28
    proc, root = _tree(tmp_path / "b", "0::/x\n", {"x/memory.max": "max", "x/memory.current": "5"})
    assert ml.cgroup_headroom(proc, root) is None


def test_the_share_is_checked_not_the_whole_model(monkeypatch):
    monkeypatch.setattr(ml, "headroom", lambda device=None: (400 * 2**20, "cgroup memory limit"))
    ml.check_parameters_fit(1000 * 2**20, 3, True, model="m")  # 334 MB of 400: fits
    with pytest.raises(MemoryError, match=r"need 500 MB on this rank \(a 1/2 ZeRO-3 share of 1,000 MB\), more than "
                                          r"the 400 MB it can still allocate \(cgroup memory limit\)"):
        ml.check_parameters_fit(1000 * 2**20, 2, True, model="m")
    with pytest.raises(MemoryError, match=r"need 1,000 MB on this rank \(all 1,000 MB \(ZeRO-3 splits"):
        ml.check_parameters_fit(1000 * 2**20, 3, False, model="m")
    # A scoring pass adds a gradient partition next to each weight partition: 2 x 334 MB > 400 MB.
    with pytest.raises(MemoryError, match=r"its parameters and their scoring gradients need 667 MB on this rank "
                                          r"\(a 1/3 ZeRO-3 share of 1,000 MB, twice\)"):
        ml.check_parameters_fit(1000 * 2**20, 3, True, model="m", scoring=True)


def test_headroom_takes_the_smallest_bound(monkeypatch):
    monkeypatch.setattr(ml, "cgroup_headroom", lambda: 900)
    monkeypatch.setattr(ml, "rlimit_headroom", lambda: 700)
    monkeypatch.setattr(ml, "mem_available", lambda: 800)
    assert ml.headroom() == (700, "RLIMIT_DATA")


@pytest.mark.parametrize("err, kind", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 9644544 bytes. Error code 12 (Cannot allocate memory)"), "can't allocate memory"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "CUDA out of memory"),
    (MemoryError("model.name 'x': its parameters need 9 MB"), "its parameters need 9 MB"),
])
def test_out_of_memory_is_one_line(err, kind, monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    line = out_of_memory_line(err)
    assert line.startswith("out of memory on rank 2 of 3 (") and kind in line and "\n" not in line
    assert "more ranks" in line


def test_other_runtime_errors_are_not_memory():
    assert out_of_memory_line(RuntimeError("shape mismatch")) is None


class _Stop(Exception):
    pass


@pytest.mark.parametrize("ds_config, bytes_per_entry, on_device", [
    ({"zero_optimization": {"stage": 3}}, 4, True),
    ({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}, 2, True),  # zero.Init casts to bf16
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, 4, False),  # the share lives on the host
])
def test_partitioned_build_checks_the_share_it_will_hold(ds_config, bytes_per_entry, on_device, monkeypatch, tmp_path):
    from gps_ds.models import create_model
    from gps_ds.zero_init import build_partitioned_model

    seen = {}

    def check(param_bytes, world, partitioned, *, model, device=None, scoring=False):
        seen.update(param_bytes=param_bytes, world=world, device=device, scoring=scoring)
        raise _Stop  # before zero.Init: only the arguments matter here

    monkeypatch.setattr(ml, "check_parameters_fit", check)
    with pytest.raises(_Stop):
        build_partitioned_model("test_vit", 10, tmp_path / "unused.safetensors", ds_config, img_size=32, scoring=True)
    numel = sum(p.numel() for p in create_model("test_vit", 10, img_size=32, device="meta").parameters())
    assert seen["param_bytes"] == numel * bytes_per_entry and seen["world"] == 1 and seen["scoring"]
    assert (seen["device"] is not None) == on_device
