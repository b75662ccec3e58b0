"""Triton kernel for the selected-entry gradient: out[r, k] = sum_m g[m, r] * x[m, idx[r, k]].

One program owns a block of BLOCK_R rows (all K entries of each) and a range of positions; it
streams (BLOCK_M, BLOCK_R) tiles of the output gradient once, gathers the matching
(BLOCK_M, BLOCK_K, BLOCK_R) input entries, multiplies in fp32 (a bf16 x bf16 product is exact
in fp32) and accumulates in fp32 registers. No gathered temporary and no dense (R, C) weight
gradient is ever formed. When R is small the positions are split over several programs; each
writes its own partial (SPLIT, K, R) slice, summed afterwards in a fixed order, so the result is
deterministic (no atomics).

Positions are addressed through two levels, position m = outer * inner_len + inner, with separate
strides for each operand, so the same kernel reads a Linear's (M, R) / (M, C) operands and a
convolution's (N, R, L) output gradient / (N, C*kh*kw, L) unfolded patches without copies.

On CUDA tensors the compiled kernel runs. On CPU tensors the same kernel body runs through
Triton's interpreter when the process was started with TRITON_INTERPRET=1 (slow; for tests,
see tests/test_triton_kernels.py); otherwise CPU tensors are refused with that reason.
"""

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # triton is an optional dependency (CUDA builds of torch bring it)
    import triton
    import triton.language as tl
except ImportError as err:  # pragma: no cover - exercised only where triton is missing
    import types

    triton = None
    tl = types.SimpleNamespace(constexpr=int)  # lets the kernel body below be defined (never run)
    _IMPORT_ERROR: str | None = f"triton is not importable ({err})"
else:
    _IMPORT_ERROR = None


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the Triton path cannot run for tensors on ``device`` (None: it can)."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    dev = torch.device(device if device is not None else "cuda")
    if dev.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if dev.type == "cpu":
        # Triton decorates its own library functions (tl.zeros, ...) at import time, so the
        # interpreter works only when the variable was set before triton was first imported.
        if triton.knobs.runtime.interpret:
            return None
        return "CPU tensors run only under Triton's interpreter (start the process with TRITON_INTERPRET=1)"
    return f"no Triton backend for device {dev.type}"


def available(device: torch.device | str | None = None) -> bool:
    return unavailable_reason(device) is None


def _sampled_body(
    g_ptr, x_ptr, idx_ptr, out_ptr,
    R, K, M, inner_len, per_split,
    sg_outer, sg_inner, sg_r,
    sx_outer, sx_inner, sx_c,
    s_idx_r, s_idx_k,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < R
    entry_ok = (ks[:, None] < K) & row_ok[None, :]
    # (BLOCK_K, BLOCK_R) selected columns; masked slots read column 0 (always in range)
    cols = tl.load(idx_ptr + rows[None, :] * s_idx_r + ks[:, None] * s_idx_k, mask=entry_ok, other=0)
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    m_start = pid_s * per_split
    m_stop = tl.minimum(m_start + per_split, M)
    for m0 in range(m_start, m_stop, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        m_ok = ms < m_stop
        outer = ms // inner_len
        inner = ms - outer * inner_len
        outer = outer.to(tl.int64)  # 64-bit offsets: M * C can pass 2**31 at large batches
        inner = inner.to(tl.int64)
        g_off = outer * sg_outer + inner * sg_inner
        x_off = outer * sx_outer + inner * sx_inner
        g = tl.load(g_ptr + g_off[:, None] + rows[None, :] * sg_r,
                    mask=m_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32)
        xg = tl.load(x_ptr + x_off[:, None, None] + cols[None, :, :] * sx_c,
                     mask=m_ok[:, None, None] & entry_ok[None, :, :], other=0.0).to(tl.float32)
        acc += tl.sum(xg * g[:, None, :], axis=0)
    out_off = pid_s * K * R + ks[:, None] * R + rows[None, :]
    tl.store(out_ptr + out_off, acc, mask=entry_ok)


@functools.lru_cache(maxsize=None)
def _kernel():
    return triton.jit(_sampled_body)  # an interpreted function when TRITON_INTERPRET=1


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def block_sizes(k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_R): the gathered tile BLOCK_M * BLOCK_K * BLOCK_R is kept at
    4096 elements (32 fp32 registers per thread at 4 warps); larger K trades positions per
    step for entries. Not tuned on hardware yet (see docs/sparse-kernels.md)."""
    bk = _next_pow2(max(k, 1))
    br = 64
    bm = max(1, 4096 // (bk * br))
    return bm, bk, br


def _splits(m: int, r_blocks: int, device: torch.device, block_m: int) -> int:
    """Position splits so that a GPU has >= ~4 programs per SM; 1 on CPU (interpreter)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (4 * sms + r_blocks - 1) // r_blocks)
    return max(1, min(want, (m + block_m - 1) // block_m))


def _launch(g: Tensor, x: Tensor, idx: Tensor, m: int, inner_len: int,
            g_strides: tuple[int, int, int], x_strides: tuple[int, int, int], splits: int | None = None) -> Tensor:
    reason = unavailable_reason(g.device)
    if reason is not None:
        raise RuntimeError(f"Triton selected-entry kernel unavailable: {reason}")
    r, k = idx.shape
    out_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    if k == 0 or r == 0 or m == 0:
        return torch.zeros(r, k, dtype=out_dtype, device=g.device)
    if g.dtype == torch.float64 or x.dtype == torch.float64:
        raise TypeError("the Triton kernel accumulates in fp32; float64 inputs take the torch paths")
    bm, bk, br = block_sizes(k)
    r_blocks = triton.cdiv(r, br)
    splits = splits or _splits(m, r_blocks, g.device, bm)
    per_split = triton.cdiv(triton.cdiv(m, splits), bm) * bm
    splits = triton.cdiv(m, per_split)
    out = torch.empty(splits, k, r, dtype=torch.float32, device=g.device)
    idx32 = idx.to(torch.int32) if idx.dtype != torch.int32 else idx
    _kernel()[(r_blocks, splits)](
        g, x, idx32, out,
        r, k, m, inner_len, per_split,
        *g_strides, *x_strides,
        idx32.stride(0), idx32.stride(1),
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br,
    )
    return (out[0] if splits == 1 else out.sum(0)).t()


def sampled_triton(g2: Tensor, x2: Tensor, idx: Tensor, valid: Tensor | None, splits: int | None = None) -> Tensor:
    """(R, K) fp32 selected-entry gradient of a Linear: g2 (M, R), x2 (M, C), idx (R, K) columns
    of x2 (padded slots clamped to a valid column and zeroed through ``valid``). ``splits``:
    position ranges summed afterwards (default: enough programs to fill the GPU; 1 on CPU)."""
    m = g2.shape[0]
    if x2.shape[0] != m:
        raise ValueError(f"output gradient has {m} positions, saved input {x2.shape[0]}")
    out = _launch(g2, x2, idx, m, max(m, 1), (0, g2.stride(0), g2.stride(1)),
                  (0, x2.stride(0), x2.stride(1)), splits)
    return out if valid is None else out.masked_fill(~valid, 0)


def conv_grad_triton(g: Tensor, x: Tensor, plan, geo, chunk_elems: int) -> Tensor:
    """Conv2d selected-entry gradient: the input unfolded to patches (N, C*kh*kw, L) in batch
    chunks of at most ``chunk_elems`` elements, read in place by the kernel together with the
    (N, R, L) output gradient (positions = (sample, pixel), no transposed copies)."""
    from .conv_kernels import global_columns

    n, c = x.shape[:2]
    r = g.shape[1]
    length = g.shape[2] * g.shape[3]
    gcol = global_columns(plan, c, geo)
    out = torch.zeros(r, plan.k, dtype=torch.float32, device=g.device)
    g3 = g.reshape(n, r, length)
    step = max(1, chunk_elems // max(c * geo.kk * length, 1))
    for n0 in range(0, n, step):
        patches = F.unfold(x[n0:n0 + step], geo.kernel_size, geo.dilation, geo.padding, geo.stride)
        gc = g3[n0:n0 + step]
        rows = gc.shape[0] * length
        out += _launch(gc, patches, gcol, rows, length,
                       (gc.stride(0), gc.stride(2), gc.stride(1)),
                       (patches.stride(0), patches.stride(2), patches.stride(1)))
    return out if plan.valid is None else out.masked_fill(~plan.valid, 0)
