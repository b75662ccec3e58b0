"""Per-row top-K of a score matrix, dense and per ZeRO shard.

Tie rule (the one order used everywhere in gps-ds)
--------------------------------------------------
Entries of a row are ranked by score, larger first; equal scores are ranked by
column index, smaller first.  This is a strict total order, so "the top-K" of a
row is always one well-defined set.  Results are returned as column indices
sorted ascending, dtype int64, shape ``(rows, K)``.

NaN scores are refused (``ValueError``): they have no place in that order.

Dense
-----
:func:`rowwise_topk` runs ``torch.topk`` and then fixes up only the rows whose
K-th value is tied with an entry outside the top-K (for real-valued gradient
scores that is almost never; for integer-valued scores it is most rows).  ``k=1``
uses ``argmax``, which already returns the first maximal index.

Sharded (DeepSpeed ZeRO)
------------------------
Under ZeRO-3 (and the flat fp32 partition of ZeRO-1/2) every rank owns one
contiguous slice of the parameter flattened to 1-D: with ``W`` ranks and ``numel``
entries each rank holds ``ceil(numel / W)`` entries starting at
``rank * ceil(numel / W)``; the last slice(s) are padded at the end.  A row of
``row_len`` (= fan_in) entries may straddle slice boundaries, and a slice may be
shorter than a row.

:func:`shard_rows_topk` is what each rank runs on its own slice: exact top-K for
the rows lying completely inside the slice, and for the (at most two) rows that
straddle the slice's ends, the local top-``min(K, part length)`` of its part of
the row under the same order (:class:`PartialCandidates`).  Because the order is
a strict total order, every entry of a row's global top-K is within the top-K of
its own part, so :func:`merge_partial_candidates` resolves the straddling rows
exactly from the gathered candidates alone; no rank ever needs the full
gradient.  Nothing here assumes equal slices: any set of contiguous fragments
that covers ``[0, numel)`` exactly once works (e.g. the per-parameter fragments
``param._hp_mapping`` gives under ZeRO-1/2).  These functions do no communication: :func:`pack_partials` /
:func:`unpack_partials` turn a rank's candidates into one fixed-size tensor that
a caller can ``all_gather``.  :func:`simulate_sharded_topk` runs the whole
protocol in one process (used by the tests and handy for checking).
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Sequence

import torch

__all__ = [
    "rowwise_topk",
    "PartialCandidates",
    "ShardTopK",
    "shard_rows_topk",
    "merge_partial_candidates",
    "assemble_sharded_topk",
    "pack_partials",
    "unpack_partials",
    "zero_shard_size",
    "simulate_sharded_topk",
]


def _check_k(k: int, row_len: int, what: str = "rows") -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 0 or k > row_len:
        raise ValueError(f"k={k} is outside [0, {row_len}] for {what} of length {row_len}")


def rowwise_topk(scores_2d: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the ``k`` best entries of every row, each row sorted ascending.

    ``scores_2d``: (rows, row_len) tensor.  Returns int64 (rows, k) on the same
    device.  Order: larger score first, ties to the smaller column index.
    """
    if scores_2d.dim() != 2:
        raise ValueError(f"rowwise_topk expects a 2-D tensor, got shape {tuple(scores_2d.shape)}")
    rows, row_len = scores_2d.shape
    _check_k(k, row_len)
    if k == 0 or rows == 0:
        return torch.empty((rows, k), dtype=torch.long, device=scores_2d.device)
    s = scores_2d
    if s.dtype == torch.bool:
        s = s.to(torch.uint8)

    if k == 1:
        # torch.argmax returns the first maximal index (the tie rule) and treats NaN
        # as the maximum, so one gather of the winners detects NaN rows.
        idx1 = s.argmax(dim=1, keepdim=True)
        if s.is_floating_point() and torch.isnan(s.gather(1, idx1)).any():
            _raise_nan(s)
        return idx1

    if k == row_len:
        if s.is_floating_point() and torch.isnan(s).any():
            _raise_nan(s)
        return torch.arange(row_len, device=s.device).expand(rows, row_len).clone()
    vals, idx = torch.topk(s, k, dim=1, largest=True, sorted=True)
    thr = vals[:, k - 1 : k]  # (rows, 1) the k-th largest value
    if s.is_floating_point() and torch.isnan(vals[:, 0]).any():
        _raise_nan(s)
    n_ge = (s >= thr).sum(dim=1)
    tied = n_ge > k  # rows where the boundary value also occurs outside the top-k
    out, _ = torch.sort(idx, dim=1)
    if bool(tied.any()):
        rid = tied.nonzero().squeeze(1)
        sub = s.index_select(0, rid)
        t = thr.index_select(0, rid)
        gt = sub > t
        need = k - gt.sum(dim=1, keepdim=True)  # how many of the tied entries to take
        eq = sub == t
        rank_eq = eq.cumsum(dim=1, dtype=torch.int32)
        keep = gt | (eq & (rank_eq <= need))
        cols = keep.nonzero()[:, 1].view(-1, k)  # row-major -> ascending columns per row
        out[rid] = cols
    return out


def _raise_nan(s: torch.Tensor) -> None:
    bad = torch.isnan(s).any(dim=1).nonzero()
    raise ValueError(f"scores contain NaN (first in row {int(bad[0])}); NaN cannot be ranked")


# --------------------------------------------------------------------------- sharded


class PartialCandidates(NamedTuple):
    """Candidates of one row that a shard sees only in part.

    ``values`` (float) and ``cols`` (int64, global column within the row, ascending)
    hold the part's own top-``min(k, part length)`` under the tie rule.
    """

    row_id: int
    values: torch.Tensor
    cols: torch.Tensor


class ShardTopK(NamedTuple):
    """What one rank computes from its slice.

    ``complete`` is the (n, k) top-K of rows ``first_row .. first_row + n - 1``
    (the rows fully inside the slice); ``partials`` the straddling rows (0-2 entries).
    """

    first_row: int
    complete: torch.Tensor
    partials: list[PartialCandidates]


def zero_shard_size(numel: int, world_size: int) -> int:
    """Entries per rank when ``numel`` is split into equal, end-padded flat slices."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return math.ceil(numel / world_size)


def _part_topk(seg: torch.Tensor, k: int, col0: int) -> tuple[torch.Tensor, torch.Tensor]:
    kk = min(k, seg.numel())
    local = rowwise_topk(seg.view(1, -1), kk)[0]
    return seg[local], local + col0


def shard_rows_topk(
    local_flat_scores: torch.Tensor, shard_start: int, numel: int, row_len: int, k: int
) -> ShardTopK:
    """Top-K of the rows inside one flat slice, plus candidates for straddling rows.

    ``local_flat_scores``: this rank's slice (1-D, may be longer than the valid part:
    entries at global positions ``>= numel`` are padding and are ignored).
    ``shard_start``: global flat offset of the slice.  ``numel``: entries of the
    whole parameter; ``row_len``: fan_in (entries per row).
    """
    if row_len <= 0 or numel % row_len != 0:
        raise ValueError(f"numel={numel} is not a multiple of row_len={row_len}")
    _check_k(k, row_len)
    flat = local_flat_scores.reshape(-1)
    valid = max(0, min(flat.numel(), numel - shard_start))
    device = flat.device
    start, end = shard_start, shard_start + valid
    if valid == 0:
        return ShardTopK(0, torch.empty((0, k), dtype=torch.long, device=device), [])

    first_full = -(-start // row_len)  # ceil
    end_full = end // row_len  # exclusive
    n_full = max(0, end_full - first_full)
    if n_full > 0:
        a = first_full * row_len - start
        block = flat[a : a + n_full * row_len].view(n_full, row_len)
        complete = rowwise_topk(block, k)
    else:
        complete = torch.empty((0, k), dtype=torch.long, device=device)

    partials: list[PartialCandidates] = []
    head_row = start // row_len
    if start % row_len != 0:
        seg_end = min(end, (head_row + 1) * row_len)
        seg = flat[0 : seg_end - start]
        v, c = _part_topk(seg, k, start - head_row * row_len)
        partials.append(PartialCandidates(head_row, v, c))
    tail_row = end // row_len
    if end % row_len != 0 and not (start % row_len != 0 and tail_row == head_row):
        seg_start = max(start, tail_row * row_len)
        seg = flat[seg_start - start : valid]
        v, c = _part_topk(seg, k, seg_start - tail_row * row_len)
        partials.append(PartialCandidates(tail_row, v, c))
    return ShardTopK(first_full if n_full > 0 else 0, complete, partials)


def merge_partial_candidates(
    partials: Iterable[PartialCandidates], k: int
) -> dict[int, torch.Tensor]:
    """Resolve straddling rows from all ranks' candidates.

    Returns ``{row_id: int64 (k,) column indices ascending}``.  Exact: the result
    equals the dense top-K of those rows, provided every part of every row is
    represented (as :func:`shard_rows_topk` on all ranks guarantees).
    """
    by_row: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for p in partials:
        vs, cs = by_row.setdefault(int(p.row_id), ([], []))
        vs.append(p.values.reshape(-1))
        cs.append(p.cols.reshape(-1).long())
    out: dict[int, torch.Tensor] = {}
    for row in sorted(by_row):
        vs, cs = by_row[row]
        v = torch.cat(vs)
        c = torch.cat(cs)
        if c.numel() < k:
            raise ValueError(
                f"row {row}: only {c.numel()} candidates gathered for k={k}; a shard is missing"
            )
        if torch.unique(c).numel() != c.numel():
            raise ValueError(f"row {row}: duplicate column candidates (overlapping shards?)")
        if v.is_floating_point() and torch.isnan(v).any():
            raise ValueError(f"row {row}: scores contain NaN; NaN cannot be ranked")
        # Order: value descending, then column ascending (two stable sorts).
        o = torch.sort(c, stable=True).indices
        v, c = v[o], c[o]
        o = torch.sort(v, descending=True, stable=True).indices
        out[row] = torch.sort(c[o[:k]]).values
    return out


def assemble_sharded_topk(
    shard_results: Sequence[ShardTopK], rows: int, k: int
) -> torch.Tensor:
    """Full (rows, k) top-K from every rank's :class:`ShardTopK` (all ranks, any order)."""
    device = shard_results[0].complete.device if shard_results else torch.device("cpu")
    out = torch.full((rows, k), -1, dtype=torch.long, device=device)
    filled = torch.zeros(rows, dtype=torch.bool, device=device)
    for r in shard_results:
        n = r.complete.shape[0]
        if n:
            out[r.first_row : r.first_row + n] = r.complete
            filled[r.first_row : r.first_row + n] = True
    merged = merge_partial_candidates((p for r in shard_results for p in r.partials), k)
    for row, cols in merged.items():
        out[row] = cols.to(device)
        filled[row] = True
    if not bool(filled.all()):
        missing = int((~filled).nonzero()[0])
        raise ValueError(f"row {missing} is covered by no shard result")
    return out


def pack_partials(partials: Sequence[PartialCandidates], k: int) -> torch.Tensor:
    """Encode a rank's (at most 2) partial rows as a fixed (2, 2 + 2k) float64 tensor.

    Layout per slot: ``[row_id, count, values(k), cols(k)]``; unused slots have
    ``row_id = -1``.  float64 holds fp32/bf16/fp16 values and column indices
    below 2**53 exactly, so the round trip is lossless and every rank's tensor has
    the same shape (as ``all_gather`` needs).
    """
    if len(partials) > 2:
        raise ValueError(f"at most 2 partial rows per shard, got {len(partials)}")
    buf = torch.full((2, 2 + 2 * k), -1.0, dtype=torch.float64)
    for i, p in enumerate(partials):
        n = p.cols.numel()
        if n > k:
            raise ValueError(f"row {p.row_id}: {n} candidates > k={k}")
        buf[i, 0] = float(p.row_id)
        buf[i, 1] = float(n)
        buf[i, 2 : 2 + n] = p.values.reshape(-1).detach().to("cpu", torch.float64)
        buf[i, 2 + k : 2 + k + n] = p.cols.reshape(-1).to("cpu", torch.float64)
    return buf


def unpack_partials(packed: torch.Tensor, k: int) -> list[PartialCandidates]:
    """Inverse of :func:`pack_partials`; accepts (2, 2+2k) or stacked (W, 2, 2+2k)."""
    rows = packed.detach().to("cpu", torch.float64).reshape(-1, 2 + 2 * k)
    out: list[PartialCandidates] = []
    for r in rows:
        row_id = int(r[0])
        if row_id < 0:
            continue
        n = int(r[1])
        out.append(
            PartialCandidates(row_id, r[2 : 2 + n].clone(), r[2 + k : 2 + k + n].long())
        )
    return out


def simulate_sharded_topk(
    scores: torch.Tensor, world_size: int, k: int, *, pad_value: float = 0.0
) -> torch.Tensor:
    """Run the sharded protocol in one process; returns the full (rows, k) top-K.

    ``scores`` has the parameter's shape (rows = dim 0, row_len = the rest).  It is
    flattened and split as ZeRO-3 does: ``ceil(numel / world_size)`` entries per
    rank, the tail padded with ``pad_value`` (which must never be selected).  The
    per-rank candidates go through :func:`pack_partials` / :func:`unpack_partials`
    as they would through ``all_gather``.
    """
    if scores.dim() < 1:
        raise ValueError("scores must have at least one dimension")
    rows = scores.shape[0]
    numel = scores.numel()
    row_len = numel // rows if rows else 0
    size = zero_shard_size(numel, world_size)
    flat = scores.reshape(-1)
    padded = torch.full((size * world_size,), pad_value, dtype=flat.dtype)
    padded[:numel] = flat
    results = []
    for rank in range(world_size):
        local = padded[rank * size : (rank + 1) * size].clone()
        r = shard_rows_topk(local, rank * size, numel, row_len, k)
        gathered = unpack_partials(pack_partials(r.partials, k), k)
        results.append(ShardTopK(r.first_row, r.complete, gathered))
    return assemble_sharded_topk(results, rows, k)
