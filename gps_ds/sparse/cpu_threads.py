"""Running a memory-bound sparse kernel as a few independent parts on CPU threads.

On CPU the gather kernel (``index_select`` along columns, multiply, sum) ran no faster at 2
threads than at 1 (ViT-S/16 b16 shapes, docs/sparse-kernels.md), while the dense matmuls
around it halve. Its position ranges are independent and torch ops release the GIL, so a small
pool of Python threads runs them side by side (1.3-2x at 2 threads). Results are combined in a
fixed order, so the output does not depend on thread timing. (``sampled_addmm`` split by rows
got slower, so the sddmm path stays whole.)
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
MIN_PART_ELEMS = 1 << 19  # below ~0.5M multiply-adds per part the thread hand-off costs more than it saves

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _forget_pool() -> None:  # a forked child inherits the executor object but not its threads
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def parts_for(device: torch.device, work: int, threads: int | None = None) -> int:
    """How many parts to split `work` multiply-adds into (1: run inline)."""
    from . import settings as S

    if device.type != "cpu":
        return 1
    limit = S.SETTINGS.cpu_parts if S.SETTINGS.cpu_parts is not None else (threads or torch.get_num_threads())
    return max(1, min(limit, work // MIN_PART_ELEMS))


def run_parts(fn: Callable[[int, int], T], total: int, parts: int) -> list[T]:
    """`fn(start, stop)` over `parts` contiguous ranges of `range(total)`, in range order."""
    bounds = [total * i // parts for i in range(parts + 1)]
    ranges = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if len(ranges) <= 1:
        return [fn(a, b) for a, b in ranges]
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < len(ranges) - 1:
            _pool = ThreadPoolExecutor(max_workers=len(ranges) - 1, thread_name_prefix="gps-sparse")
            _pool_size = len(ranges) - 1
        pool = _pool
    futures = [pool.submit(fn, a, b) for a, b in ranges[1:]]
    first = fn(*ranges[0])  # this thread does a share too
    return [first, *(f.result() for f in futures)]


def sum_in_order(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    out = tensors[0]
    for t in tensors[1:]:
        out = out.add_(t)
    return out
