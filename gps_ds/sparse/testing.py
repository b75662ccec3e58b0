"""Random selections for tests and benchmarks (not a selection scheme: see gps_ds.selection)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


def random_indices(
    rows: int, fan_in: int, k: int, *, generator: torch.Generator | None = None, pad: bool = False
) -> Tensor:
    """(rows, k) int64 sorted distinct column indices per row; with ``pad`` some rows end in -1."""
    scores = torch.rand(rows, fan_in, generator=generator)
    idx = scores.topk(k, dim=1).indices.sort(dim=1).values
    if pad and k > 0:
        counts = torch.randint(0, k + 1, (rows,), generator=generator)
        counts[0] = 0  # always one fully padded row
        slot = torch.arange(k).expand(rows, k)
        idx = idx.masked_fill(slot >= counts.unsqueeze(1), -1)
    return idx


def random_selection(
    model: nn.Module, k: int, *, seed: int = 0, pad: bool = False, types: tuple[type, ...] = (nn.Linear, nn.Conv2d)
) -> dict[str, Tensor]:
    """K random entries per row of the weight of every module of ``types`` (K capped at fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, types) and getattr(module, "weight", None) is not None:
            w = module.weight
            fan_in = w[0].numel()
            key = f"{name}.weight" if name else "weight"
            out[key] = random_indices(w.shape[0], fan_in, min(k, fan_in), generator=gen, pad=pad).to(torch.int32)
    return out
