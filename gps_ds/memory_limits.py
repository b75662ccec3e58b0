"""How much more memory this rank may take, and a check before a model is built.

A rank's host memory is bounded by the smallest of: its cgroup's limit (v1 ``memory.limit_in_bytes``
or v2 ``memory.max``, minus what the cgroup already uses; Slurm, Kubernetes and Docker set one),
its ``RLIMIT_DATA`` (minus the private memory it holds) and the machine's ``MemAvailable``. On a
GPU the parameters live in device memory: ``torch.cuda.mem_get_info``. Checked before building, a
model whose parameter share cannot fit fails in one line instead of in the middle of the build (or
by the kernel's OOM killer, which leaves no message).
"""

from __future__ import annotations

import math
import resource
from pathlib import Path

import torch

UNLIMITED = 1 << 60


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def cgroup_headroom(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """limit - usage of this process's memory cgroup (v2 or v1); None without a limit."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2
            base = Path(root) / rel
            limit, used = _read_int(base / "memory.max"), _read_int(base / "memory.current")
        elif "memory" in controllers.split(","):
            base = Path(root) / "memory" / rel
            limit, used = _read_int(base / "memory.limit_in_bytes"), _read_int(base / "memory.usage_in_bytes")
        else:
            continue
        if limit is not None and used is not None and limit < UNLIMITED:
            return max(0, limit - used)
    return None


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rlimit_headroom() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    held = _status_kib("VmData")
    if soft == resource.RLIM_INFINITY or held is None:
        return None
    return max(0, soft - held * 1024)


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def headroom(device: torch.device | None = None) -> tuple[int, str] | None:
    """(bytes this rank may still allocate, where the bound comes from), or None if unknown."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {device}"
    found = [(v, name) for v, name in ((cgroup_headroom(), "cgroup memory limit"),
                                        (rlimit_headroom(), "RLIMIT_DATA"),
                                        (mem_available(), "MemAvailable")) if v is not None]
    return min(found) if found else None


def check_parameters_fit(param_bytes: int, world: int, partitioned: bool, *, model: str,
                         device: torch.device | None = None, scoring: bool = False) -> None:
    """Refuse in one line when this rank's share of the parameters (and, when a scoring pass
    follows, of their gradients: every candidate weight gets one) exceeds its headroom."""
    share_bytes = math.ceil(param_bytes / world) if partitioned else param_bytes
    need = share_bytes * (2 if scoring else 1)
    room = headroom(device)
    if room is None or need <= room[0]:
        return
    share = f"a 1/{world} ZeRO-3 share of {param_bytes / 2**20:,.0f} MB" if partitioned and world > 1 else (
        f"all {param_bytes / 2**20:,.0f} MB" + (" (ZeRO-3 splits them over ranks)" if not partitioned else ""))
    what = "its parameters and their scoring gradients" if scoring else "its parameters"
    raise MemoryError(f"model.name '{model}': {what} need {need / 2**20:,.0f} MB on this rank ({share}"
                      f"{', twice' if scoring else ''}), more than the {room[0] / 2**20:,.0f} MB it can still "
                      f"allocate ({room[1]})")
