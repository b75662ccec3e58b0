"""Validation of one selection entry and the index tables the kernels derive from it.

A selection entry is an integer tensor (rows, K) of column indices into the row of a
weight flattened to fan_in, each row sorted ascending without duplicates, optionally
padded with -1 at the end of the row (variable-count schemes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


class SelectionError(ValueError):
    """A selection entry does not fit the parameter it names."""


def check_indices(name: str, indices: Tensor, rows: int, fan_in: int) -> tuple[Tensor, Tensor | None]:
    """Validate one selection entry; return (int64 indices with -1 kept, bool valid mask or None).

    ``valid`` is None when no row is padded. Raises SelectionError naming ``name``.
    """
    if not isinstance(indices, Tensor):
        raise SelectionError(f"{name}: selection entry must be a tensor, got {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise SelectionError(f"{name}: selection indices must be an integer tensor, got {indices.dtype}")
    if indices.dim() != 2 or indices.shape[0] != rows:
        raise SelectionError(
            f"{name}: selection shape {tuple(indices.shape)} does not fit the parameter; "
            f"expected (rows={rows}, K) with fan_in={fan_in}"
        )
    k = indices.shape[1]
    if k > fan_in:
        raise SelectionError(f"{name}: K={k} selected entries per row but fan_in is only {fan_in}")
    idx = indices.detach().to(torch.int64)
    bad = (idx < -1) | (idx >= fan_in)
    if bad.any():
        r, s = (int(v) for v in bad.nonzero()[0])
        raise SelectionError(
            f"{name}: index {int(idx[r, s])} at row {r}, slot {s} is out of range [0, {fan_in}) "
            f"(-1 is allowed only as end-of-row padding)"
        )
    valid = idx >= 0
    if k > 1:
        late = valid[:, 1:] & ~valid[:, :-1]
        if late.any():
            r = int(late.nonzero()[0, 0])
            raise SelectionError(f"{name}: row {r} has -1 padding before a valid index; pad only at the end")
        unsorted = valid[:, 1:] & (idx[:, 1:] <= idx[:, :-1])
        if unsorted.any():
            r = int(unsorted.nonzero()[0, 0])
            raise SelectionError(f"{name}: row {r} is not sorted ascending or holds a duplicate index")
    return idx, (None if bool(valid.all()) else valid)


@dataclass
class IndexPlan:
    """Index tables derived once from (indices, valid) on one device.

    ``idx``: indices with padding clamped to 0 (padded slots are masked by ``valid``).
    ``cols``: sorted distinct selected columns when saving only those input columns
    pays off (``local`` then indexes into ``cols``), else None and ``local`` is ``idx``.
    """

    idx: Tensor
    valid: Tensor | None
    fan_in: int
    cols: Tensor | None
    local: Tensor
    source: tuple  # (indices, version, valid, version, compact_ratio) it was built from
    _extra: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.idx.shape[0]

    @property
    def k(self) -> int:
        return self.idx.shape[1]

    def matches(self, indices: Tensor, valid: Tensor | None, compact_ratio: float) -> bool:
        # Identity + version counter: reassignment, device moves and in-place edits
        # (load_state_dict copies into the buffer) all invalidate the plan.
        src_idx, idx_ver, src_valid, valid_ver, ratio = self.source
        return (
            src_idx is indices
            and idx_ver == indices._version
            and src_valid is valid
            and (valid is None or valid_ver == valid._version)
            and ratio == compact_ratio
        )

    def cached(self, name, make):
        """Memoise a derived table (CSR layout, conv index tables, ...) on this plan."""
        if name not in self._extra:
            self._extra[name] = make()
        return self._extra[name]


def build_plan(indices: Tensor, valid: Tensor | None, fan_in: int, compact_ratio: float) -> IndexPlan:
    """Build the index tables; ``compact_ratio`` decides when to save only the selected columns."""
    idx = indices.clamp(min=0) if valid is not None else indices
    cols = None
    local = idx
    if compact_ratio > 0 and idx.numel() > 0:
        chosen = idx[valid] if valid is not None else idx.reshape(-1)
        uniq = torch.unique(chosen)
        if 0 < uniq.numel() <= compact_ratio * fan_in:
            cols = uniq
            local = torch.searchsorted(uniq, idx.reshape(-1)).view_as(idx)
            if valid is not None:
                local = local.masked_fill(~valid, 0)
    source = (indices, indices._version, valid, None if valid is None else valid._version, compact_ratio)
    return IndexPlan(idx=idx, valid=valid, fan_in=fan_in, cols=cols, local=local, source=source)
