"""Shared helpers: machine description, peak memory, timing."""

from __future__ import annotations

import os
import platform
import resource
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine(device: str = "cpu") -> dict:
    import torch

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_average": load_average(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        from gps_ds.sparse import native

        reason = native.unavailable_reason()
        info["cpu_gather_kernel"] = "fused C kernel" if reason is None else f"torch ops ({reason})"
    return info


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB (VmHWM = peak RSS, VmRSS = current); 0 if absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes on the machine have spent busy (Linux /proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


class OtherLoad:
    """Cores' worth of CPU that *other* processes used while the block ran: the machine's busy
    time minus this process's and its (waited-for) children's. Unlike the load average it does
    not count the benchmark itself. ``cores`` is None where /proc/stat is unavailable."""

    cores: float | None = None

    def __enter__(self) -> "OtherLoad":
        self._t0, self._busy0, self._own0 = time.monotonic(), _machine_busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self._t0
        busy = _machine_busy_seconds()
        if busy is None or self._busy0 is None or wall <= 0:
            return
        other = (busy - self._busy0) - (_own_seconds() - self._own0)
        self.cores = round(max(0.0, other) / wall, 2)
