"""Kernel-path settings and the shape rules that pick a path when set to "auto".

The rules were measured on CPU (torch 2.14, 2 shared cores); see docs/sparse-kernels.md
for the numbers. The CUDA rules are a table (``CUDA_LINEAR_RULES``) estimated without a GPU;
`gps-ds bench kernels --device cuda` measures every path and says where the table disagrees.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator

import torch

LINEAR_GRAD_PATHS = ("gather", "fused", "sddmm", "dense")
CONV_GRAD_PATHS = ("gather", "unfold", "dense")
# Accepted for both gradients but kept out of the tuples above (which the CPU tests sweep):
# the Triton kernel runs on CUDA, on CPU only under TRITON_INTERPRET=1 (tests/test_triton_kernels.py).
TRITON_PATH = "triton"

# CUDA rule table for the selected-entry gradient: the first row whose dtype kind and K bound
# match decides; "triton" (gps_ds/sparse/triton_kernels.py) becomes "gather" where Triton cannot
# run. Past the table, a cost estimate picks the sampled path while a gathered element costs
# less than CUDA_DENSE_RATIO dense multiply-adds, else the dense product. NOT MEASURED (no GPU
# was lent when it was written): K <= 10 never forms a dense weight gradient (issue 12); replace
# the rows by what `gps-ds bench kernels --device cuda` measures (docs/sparse-kernels.md).
CUDA_LINEAR_RULES: tuple[tuple[str, int, str], ...] = (
    ("half", 10, "triton"),  # bf16 / fp16
    ("fp32", 10, "triton"),
    ("fp64", 10, "gather"),  # the Triton kernel accumulates in fp32
)
CUDA_DENSE_RATIO = {"half": 400, "fp32": 100, "fp64": 100}
WEIGHT_PATHS = ("merge", "add")


@dataclass
class KernelSettings:
    """Process-wide kernel choices; "auto" lets the shape rules below decide.

    forward / input_grad: "merge" writes the K entries per row into the base weight for the
    duration of one matmul (a cast copy when autocast changes the dtype); "add" multiplies
    by the frozen base and adds the K-sparse term (Linear only).
    linear_grad: "gather" | "fused" | "sddmm" | "dense" for the selected-entry gradient of
    Linear ("fused": the C kernel of ``native``, CPU float32/float64; elsewhere it runs "gather").
    conv_grad: "gather" | "unfold" | "dense" for Conv2d.
    "triton" (both): the Triton kernel of ``triton_kernels`` (CUDA; CPU only under
    TRITON_INTERPRET=1), over the unfolded patches for Conv2d.
    chunk_bytes: memory bound of one gathered temporary (None: per-device default).
    compact_ratio: save only the selected input columns of a Linear for backward when
    there are at most compact_ratio * in_features distinct ones (0 disables).
    recompute_inputs: a Linear whose input is a LayerNorm or GELU output keeps nothing for its
    selected-entry gradient and recomputes the input in backward from what that node saves
    (``autograd._input_recipe``).
    cpu_parts: CPU threads the gather kernel splits into (None: torch's thread count;
    1: inline), see ``cpu_threads``.
    """

    forward: str = "auto"
    input_grad: str = "auto"
    linear_grad: str = "auto"
    conv_grad: str = "auto"
    chunk_bytes: int | None = None
    compact_ratio: float = 0.5
    recompute_inputs: bool = True
    cpu_parts: int | None = None


SETTINGS = KernelSettings()

_CHOICES = {
    "forward": WEIGHT_PATHS,
    "input_grad": WEIGHT_PATHS,
    "linear_grad": (*LINEAR_GRAD_PATHS, TRITON_PATH),
    "conv_grad": (*CONV_GRAD_PATHS, TRITON_PATH),
}


@contextmanager
def kernel_settings(**overrides) -> Iterator[KernelSettings]:
    """Temporarily override fields of SETTINGS, e.g. ``with kernel_settings(linear_grad="dense"):``."""
    names = {f.name for f in fields(KernelSettings)}
    for key, value in overrides.items():
        if key not in names:
            raise TypeError(f"unknown kernel setting {key!r}; known: {sorted(names)}")
        if key in _CHOICES and value not in (*_CHOICES[key], "auto"):
            raise ValueError(f"{key}={value!r}; choose 'auto' or one of {_CHOICES[key]}")
    saved = {key: getattr(SETTINGS, key) for key in overrides}
    for key, value in overrides.items():
        setattr(SETTINGS, key, value)
    try:
        yield SETTINGS
    finally:
        for key, value in saved.items():
            setattr(SETTINGS, key, value)


def chunk_elems(device: torch.device, element_size: int) -> int:
    """Elements allowed in one gathered temporary.

    CPU: 4 MiB; cache-sized chunks measured up to 2x faster than one big gather at one
    thread, while bigger chunks mean fewer parallel regions on a shared 2-core machine.
    CUDA: 256 MiB keeps the number of launches low while bounding the transient memory.
    """
    nbytes = SETTINGS.chunk_bytes
    if nbytes is None:
        nbytes = (256 << 20) if device.type == "cuda" else (4 << 20)
    return max(1, nbytes // element_size)


def choose_weight_path(setting: str, positions: int, rows: int, k: int, fan_in: int) -> str:
    """"merge" (write the K entries into the base, one matmul) or "add" (base matmul + K-sparse term).

    Since the merge writes the entries into the base's storage instead of copying the
    weight, it measured as fast or faster than "add" for every shape tried (M = 1..256
    positions, K = 1..8, 768x768 and 1000x768 weights), so "auto" always merges.
    """
    return "merge" if setting == "auto" else setting


def choose_linear_grad(
    positions: int,
    rows: int,
    k: int,
    cols: int,
    dtype: torch.dtype,
    device: torch.device,
    threads: int | None = None,
) -> str:
    """Cheapest of gather / fused / sddmm / dense for the selected-entry gradient of a Linear.

    ``cols`` is the width of the saved input (in_features, or the distinct selected columns);
    ``threads``: CPU threads (default torch's count).
    """
    if SETTINGS.linear_grad != "auto":
        return SETTINGS.linear_grad
    work = positions * rows * k
    dense = positions * rows * cols
    if device.type != "cpu":
        return cuda_linear_grad(positions, rows, k, cols, dtype, device)
    # CPU cost model in ns, fitted on one thread (torch 2.14, docs/sparse-kernels.md).
    # gather: ~0.8 per gathered element plus one pass over the saved input rows;
    # fused (one C pass, no temporary): ~0.35 per element plus ~0.5 per saved input element;
    # sddmm (sampled_addmm) pays for transposing both operands (dearer once the input no
    # longer fits in cache), then ~0.12 per entry; dense: one matmul.
    # The constants are each path's fixed per-call cost (op dispatch; sddmm also builds the
    # CSR tensor; fused allocates per-part buffers and crosses ctypes), measured at M = 2..34
    # positions: gather ~15 us, fused ~20 us, dense ~6 us, sddmm ~25 us. They only decide tiny
    # layers (e.g. 10 positions x 192 x 64), where dense is cheapest.
    # With several threads, matmuls and the gather/fused parts (``cpu_threads``) scale while
    # sampled_addmm does not (measured: no faster at 2 threads); 0.8 of linear scaling is assumed.
    from .cpu_threads import parts_for

    threads = threads or torch.get_num_threads()
    split = 1 + 0.8 * (min(threads, parts_for(device, work, threads)) - 1)
    matmul = 1 + 0.8 * (threads - 1)
    cost = {
        "gather": 15e3 + (0.8 * work + 0.6 * positions * cols) / split,
        "dense": 6e3 + 0.0195 * dense / matmul,
    }
    if dtype in (torch.float32, torch.float64):  # no half kernels for these two on CPU
        from . import native

        if native.available():
            cost["fused"] = 20e3 + (0.35 * work + 0.5 * positions * cols) / split
        x_pass = 1.4 if cols <= 2048 else 3.4
        cost["sddmm"] = 25e3 + 1.4 * positions * rows + x_pass * positions * cols + 0.12 * work
    return min(cost, key=cost.get)


def dtype_kind(dtype: torch.dtype) -> str:
    return {torch.float64: "fp64", torch.float32: "fp32"}.get(dtype, "half")


def _triton_or_gather(device: torch.device) -> str:
    from . import triton_kernels

    return "triton" if triton_kernels.available(device) else "gather"


def cuda_table_path(k: int, dtype: torch.dtype) -> str | None:
    """The CUDA_LINEAR_RULES path for (K, dtype), or None past the table."""
    kind = dtype_kind(dtype)
    for row_kind, max_k, path in CUDA_LINEAR_RULES:
        if row_kind == kind and k <= max_k:
            return path
    return None


def cuda_linear_grad(positions: int, rows: int, k: int, cols: int, dtype: torch.dtype,
                     device: torch.device) -> str:
    """The CUDA rule: ``CUDA_LINEAR_RULES`` first, then the sampled/dense cost estimate."""
    path = cuda_table_path(k, dtype)
    if path is None:
        kind = dtype_kind(dtype)
        path = "triton" if kind != "fp64" else "gather"
        if positions * rows * k * CUDA_DENSE_RATIO[kind] >= positions * rows * cols:
            path = "dense"
    return _triton_or_gather(device) if path == "triton" else path


def cuda_conv_grad(k: int, groups: int, work: int, macs: int, dtype: torch.dtype, device: torch.device) -> str:
    """CUDA conv rule (not measured): within the table's K, Triton over unfolded patches for
    ungrouped convolutions (patch embeddings: the patch matrix is the input itself) and the
    direct gather for grouped / depthwise ones (unfolding a 7x7 depthwise input is 49x its size);
    past it, the cost estimate of ``cuda_linear_grad``."""
    path = cuda_table_path(k, dtype)
    if path is not None:
        if path == "triton" and groups != 1:
            return "gather"
        return _triton_or_gather(device) if path == "triton" else path
    return "gather" if work * CUDA_DENSE_RATIO[dtype_kind(dtype)] < macs else "dense"


def choose_conv_grad(
    batch: int,
    in_channels: int,
    rows: int,
    k: int,
    out_pixels: int,
    kernel_elems: int,
    groups: int,
    dtype: torch.dtype,
    device: torch.device,
) -> str:
    """Cheapest of gather / unfold / dense for the selected-entry gradient of a Conv2d."""
    if SETTINGS.conv_grad != "auto":
        return SETTINGS.conv_grad
    fan_in = in_channels // groups * kernel_elems
    work = batch * out_pixels * rows * k
    macs = batch * out_pixels * rows * fan_in
    if device.type != "cpu":
        return cuda_conv_grad(k, groups, work, macs, dtype, device)
    # CPU cost model in ns (one thread). The dense weight gradient of grouped / depthwise
    # convolutions is ~25x slower per multiply-add than the dense one on CPU.
    cost = {
        "gather": 1.6 * work,
        "unfold": 1.5 * batch * in_channels * kernel_elems * out_pixels + 1.0 * work,
        "dense": (0.025 if groups == 1 else 0.6) * macs,
    }
    return min(cost, key=cost.get)
