"""Exact metric reduction across ranks for the exactly-once evaluation loader."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

Number = Union[int, float, torch.Tensor]


def _device(device: Optional[Union[str, torch.device]]) -> torch.device:
    if device is not None:
        return torch.device(device)
    from gps_ds.distributed import accelerator_device

    return accelerator_device()  # gloo on a CPU machine: the CPU; nccl: this rank's GPU


def reduce_sums(values: Sequence[Number], device: Optional[Union[str, torch.device]] = None) -> list[Number]:
    """Sum each value over all ranks (one all-reduce). Integers are summed as int64, so the
    result is exact; floats as float64. Without torch.distributed: the values themselves."""
    as_int = [isinstance(v, int) or (isinstance(v, torch.Tensor) and not v.is_floating_point()) for v in values]
    if not (dist.is_available() and dist.is_initialized()):
        return [int(v) if i else float(v) for v, i in zip(values, as_int)]
    dev = _device(device)
    ints = torch.tensor([int(v) for v, i in zip(values, as_int) if i], dtype=torch.int64, device=dev)
    floats = torch.tensor([float(v) for v, i in zip(values, as_int) if not i], dtype=torch.float64, device=dev)
    for t in (ints, floats):  # every rank passes the same kinds of values, so runs the same collectives
        if t.numel():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    ints_l, floats_l = iter(ints.tolist()), iter(floats.tolist())
    return [next(ints_l) if i else next(floats_l) for i in as_int]


def count_correct(logits: torch.Tensor, targets: torch.Tensor, valid: Optional[torch.Tensor] = None) -> tuple[int, int]:
    """``(correct, count)`` of top-1 predictions over the valid entries of a batch."""
    pred = logits.argmax(dim=-1)
    if targets.ndim > 1:  # soft targets
        targets = targets.argmax(dim=-1)
    hit = pred.eq(targets.to(pred.device))
    if valid is not None:
        valid = valid.to(hit.device)
        return int((hit & valid).sum()), int(valid.sum())
    return int(hit.sum()), int(hit.numel())


def reduce_accuracy(correct: int, count: int, device: Optional[Union[str, torch.device]] = None) -> tuple[int, int]:
    """``(sum of correct, sum of count)`` over all ranks, exactly (int64 all-reduce)."""
    total_correct, total_count = reduce_sums([int(correct), int(count)], device)
    return int(total_correct), int(total_count)
