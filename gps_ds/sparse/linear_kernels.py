"""Pure-torch kernels for a weight whose rows carry K trainable entries.

Shapes: ``g2`` (M, R) output gradient, ``x2`` (M, C) saved input (or only its selected
columns), ``idx`` (R, K) int64 column of each selected entry in ``x2``, ``valid`` (R, K)
bool or None. ``M`` is the number of positions (batch x tokens, or batch x pixels).
Every sampled-product kernel returns (R, K) in an fp32/fp64 accumulation dtype with
padded slots set to 0.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from . import native
from . import settings as S
from .cpu_threads import parts_for, run_parts, sum_in_order
from .indices import IndexPlan


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_values(values: Tensor, valid: Tensor | None, dtype: torch.dtype) -> Tensor:
    v = values.to(dtype)
    return v if valid is None else v.masked_fill(~valid, 0)


def effective_weight(base: Tensor, values: Tensor, idx: Tensor, valid: Tensor | None) -> Tensor:
    """Dense W_eff = base + scatter(values), as a new tensor shaped like ``base``."""
    rows = base.shape[0]
    flat = base.reshape(rows, -1)
    # scatter_add (not scatter): padded slots add an exact 0 at their clamped column.
    return flat.scatter_add(1, idx, masked_values(values, valid, base.dtype)).view(base.shape)


def flat_positions(plan: IndexPlan) -> Tensor:
    """(nnz,) positions of the valid selected entries in the flattened weight."""

    def make() -> Tensor:
        rows = torch.arange(plan.rows, device=plan.idx.device).unsqueeze(1) * plan.fan_in
        pos = rows + plan.idx
        return pos.reshape(-1) if plan.valid is None else pos[plan.valid]

    return plan.cached("flat_positions", make)


@contextmanager
def written_weight(base: Tensor, values: Tensor, plan: IndexPlan, dtype: torch.dtype) -> Iterator[Tensor]:
    """Yield the dense effective weight base + scatter(values) in ``dtype``.

    When ``base`` already has ``dtype`` the K entries per row are written into its storage
    (through ``.data``, so the Parameter's version counter is untouched) and the original
    entries are restored on exit: no weight-sized copy is made. Measured on ViT-S/16 this
    removes ~100 transient weight copies per step, which cost as much as 25% of the
    backward on a loaded 2-core machine.
    """
    if base.dtype != dtype:
        yield effective_weight(base, values, plan.idx, plan.valid).to(dtype)
        return
    data = base.data
    flat = data.view(-1)
    pos = flat_positions(plan)
    vals = values.detach()
    vals = vals.reshape(-1) if plan.valid is None else vals[plan.valid]
    old = flat.index_select(0, pos)
    flat.index_copy_(0, pos, old + vals.to(dtype))
    try:
        yield data
    finally:
        flat.index_copy_(0, pos, old)


def sparse_term(x2: Tensor, values: Tensor, idx: Tensor, valid: Tensor | None) -> Tensor:
    """(M, R) with out[m, r] = sum_k values[r, k] * x2[m, idx[r, k]]."""
    vals = masked_values(values, valid, x2.dtype)
    out = x2.new_zeros(x2.shape[0], idx.shape[0])
    for k in range(idx.shape[1]):
        out.addcmul_(x2.index_select(1, idx[:, k]), vals[:, k])
    return out


def sparse_term_input_grad(g2: Tensor, values: Tensor, idx: Tensor, valid: Tensor | None, gx2: Tensor) -> Tensor:
    """Adds the transpose of ``sparse_term`` into ``gx2`` (M, C): gx2[m, idx[r,k]] += g2[m,r] * values[r,k]."""
    vals = masked_values(values, valid, g2.dtype)
    for k in range(idx.shape[1]):
        gx2.index_add_(1, idx[:, k], g2 * vals[:, k])
    return gx2


def sampled_gather(g2: Tensor, x2: Tensor, idx: Tensor, valid: Tensor | None, chunk_elems: int) -> Tensor:
    """Gather-based sampled product. Positions are chunked so the gathered (chunk, K, R)
    temporary stays under ``chunk_elems``; on CPU a cache-sized chunk measured up to 2x
    faster than one big gather, and one k-major gather per chunk (instead of one per k)
    keeps the number of kernels independent of K. On CPU, position ranges run as parts on
    several threads (``cpu_threads``)."""
    m, r = g2.shape
    k = idx.shape[1]
    adt = acc_dtype(g2.dtype)
    if k == 0:
        return torch.zeros(r, k, dtype=adt, device=g2.device)
    flat = idx.t().reshape(-1)
    step = max(1, chunk_elems // (r * k))

    def positions(m0: int, m1: int) -> Tensor:
        out = torch.zeros(k, r, dtype=adt, device=g2.device)
        for a in range(m0, m1, step):
            b = min(a + step, m1)
            prod = x2[a:b].index_select(1, flat).view(-1, k, r)
            prod.mul_(g2[a:b].unsqueeze(1))
            out.add_(prod.sum(0, dtype=adt))
        return out

    parts = run_parts(positions, m, parts_for(g2.device, m * r * k))
    out = sum_in_order(parts).t()
    return out if valid is None else out.masked_fill(~valid, 0)


def fused_index(idx: Tensor, width: int) -> Tensor:
    """(K, R) int32 table for the fused kernel; every entry is checked to lie in [0, width)
    once here, since the C loop reads x2[m, idx] unchecked."""
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= width):
        raise ValueError(f"selected column out of range [0, {width}) for the fused gather kernel")
    return idx.t().contiguous().to(torch.int32)


def sampled_fused(g2: Tensor, x2: Tensor, idx: Tensor, valid: Tensor | None, idx_t: Tensor | None = None) -> Tensor:
    """The gather product in one pass per position (C, ``native``): no gathered temporary.
    Position ranges run as parts on CPU threads like ``sampled_gather``. Other devices and
    dtypes (CUDA, half precision), or a machine where the C kernel cannot be built (the
    reason is logged once), take ``sampled_gather``."""
    return fused_grads(g2, x2, idx, valid, idx_t, bias=False)[0]


def fused_grads(
    g2: Tensor, x2: Tensor, idx: Tensor, valid: Tensor | None, idx_t: Tensor | None = None, bias: bool = True
) -> tuple[Tensor, Tensor | None]:
    """(selected-entry gradient (R, K), bias gradient (R,) or None): ``sampled_fused``, and with
    ``bias`` the column sums of ``g2`` accumulated in the same pass over it (one read of the
    output gradient instead of two)."""
    m, r = g2.shape
    k = idx.shape[1]
    adt = acc_dtype(g2.dtype)
    if k == 0 or m == 0 or not (native.supports(g2) and native.supports(x2) and native.available()):
        values = sampled_gather(g2, x2, idx, valid, S.chunk_elems(g2.device, g2.element_size()))
        return values, (g2.sum(0, dtype=adt) if bias else None)
    g2, x2 = g2.to(adt), x2.to(adt)
    g2 = g2 if g2.stride(1) == 1 else g2.contiguous()
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    idx_t = fused_index(idx, x2.shape[1]) if idx_t is None else idx_t

    def positions(m0: int, m1: int) -> tuple[Tensor, Tensor | None]:
        out = torch.zeros(k, r, dtype=adt)
        col_sums = torch.zeros(r, dtype=adt) if bias else None
        native.fused_gather_into(out, x2, g2, idx_t, m0, m1, col_sums)
        return out, col_sums

    parts = run_parts(positions, m, parts_for(g2.device, m * r * k))
    values = sum_in_order([p[0] for p in parts]).t()
    values = values if valid is None else values.masked_fill(~valid, 0)
    return values, (sum_in_order([p[1] for p in parts]) if bias else None)


def csr_layout(idx: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    r, k = idx.shape
    if valid is None:
        crow = torch.arange(r + 1, device=idx.device, dtype=torch.int64) * k
        return crow, idx.reshape(-1)
    counts = valid.sum(1)
    crow = torch.zeros(r + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=crow[1:])
    # padding is trailing, so the row-major order of valid entries is CSR order
    return crow, idx[valid]


def sampled_sddmm(
    g2: Tensor, x2: Tensor, idx: Tensor, valid: Tensor | None, csr: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Sampled dense-dense product through torch.sparse.sampled_addmm (fp32/fp64 only)."""
    r, k = idx.shape
    crow, col = csr if csr is not None else csr_layout(idx, valid)
    adt = acc_dtype(g2.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        pattern = torch.sparse_csr_tensor(
            crow, col, torch.zeros(col.numel(), dtype=adt, device=g2.device), size=(r, x2.shape[1]),
            check_invariants=False,
        )
        vals = torch.sparse.sampled_addmm(pattern, g2.t().to(adt), x2.to(adt), beta=0.0).values()
    if valid is None:
        return vals.view(r, k)
    out = torch.zeros(r, k, dtype=adt, device=g2.device)
    out[valid] = vals
    return out


def sampled_dense(g2: Tensor, x2: Tensor, idx: Tensor, valid: Tensor | None) -> Tensor:
    """Dense-then-gather: the full (R, C) product g2^T x2, then the K entries per row."""
    full = g2.t().matmul(x2)
    out = full.gather(1, idx).to(acc_dtype(g2.dtype))
    return out if valid is None else out.masked_fill(~valid, 0)


def sampled_product(
    path: str,
    g2: Tensor,
    x2: Tensor,
    idx: Tensor,
    valid: Tensor | None,
    chunk_elems: int,
    table: object = None,
) -> Tensor:
    """out[r, k] = sum_m g2[m, r] * x2[m, idx[r, k]] by the named kernel path.

    ``table``: the path's precomputed index table, if cached (``csr_layout`` for sddmm,
    ``fused_index`` for fused, int32 columns for triton)."""
    if path == "gather":
        return sampled_gather(g2, x2, idx, valid, chunk_elems)
    if path == "fused":
        return sampled_fused(g2, x2, idx, valid, table)
    if path == "sddmm":
        return sampled_sddmm(g2, x2, idx, valid, table)
    if path == "dense":
        return sampled_dense(g2, x2, idx, valid)
    if path == "triton":
        from .triton_kernels import sampled_triton

        return sampled_triton(g2, x2, idx if table is None else table, valid)
    raise ValueError(f"unknown sampled-product path {path!r}; use 'gather', 'fused', 'sddmm', 'dense' or 'triton'")
