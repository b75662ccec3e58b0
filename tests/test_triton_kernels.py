"""The Triton selected-entry gradient kernel against float64 dense references, and the CUDA rules.

The kernel tests run on CUDA when there is a GPU. Without one they run on CPU tensors through
Triton's interpreter, which works only if TRITON_INTERPRET=1 was set before triton was first
imported (DeepSpeed imports it, so not inside this pytest process): ``test_interpreter_on_cpu``
runs this file again in a subprocess with the variable set.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gps_ds.sparse import apply_sparse, kernel_settings, merged_weight
from gps_ds.sparse import settings as S
from gps_ds.sparse.testing import random_indices

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if CUDA else "cpu")


_skip = pytest.mark.skipif(
    not (CUDA or INTERPRET),
    reason="needs CUDA, or CPU with TRITON_INTERPRET=1 set before triton's import "
           "(test_interpreter_on_cpu runs these in such a subprocess)",
)


def needs_kernel(test):
    return pytest.mark.gpu(_skip(test))  # also part of `make test-gpu`
DTYPES = [torch.float32, torch.bfloat16]


def _reference(g, x, idx, valid):
    """float64 dense g^T x, then the selected entries (of the same, already rounded inputs)."""
    full = g.double().t() @ x.double()
    out = full.gather(1, idx.clamp(min=0))
    return out if valid is None else out.masked_fill(~valid, 0)


def _tolerance(ref, m):
    # fp32 accumulation of m exact products: error ~ m * 2^-24 * max|partial sum|
    return 4 * m * 2.0 ** -24 * float(ref.abs().max() + 1)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,r,c,k,pad", [(37, 70, 50, 3, True), (200, 130, 96, 1, False), (65, 9, 300, 10, True)])
def test_linear_kernel_matches_float64(dtype, m, r, c, k, pad):
    from gps_ds.sparse.triton_kernels import sampled_triton

    gen = torch.Generator().manual_seed(m + k)
    g = torch.randn(m, r, generator=gen).to(dtype).to(DEVICE)
    x = torch.randn(m, c, generator=gen).to(dtype).to(DEVICE)
    raw = random_indices(r, c, k, generator=gen, pad=pad)
    valid = (raw >= 0) if pad else None
    idx = raw.clamp(min=0).to(DEVICE)
    valid = None if valid is None else valid.to(DEVICE)
    out = sampled_triton(g, x, idx, valid)
    assert out.dtype == torch.float32 and out.shape == (r, k)
    ref = _reference(g, x, idx, valid)
    assert (out.double() - ref).abs().max().item() <= _tolerance(ref, m)
    if valid is not None:
        assert torch.all(out[~valid] == 0)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_kernel_splits_and_strides(dtype):
    """Several position ranges summed afterwards, a transposed (non-contiguous) output gradient
    and a column subset (the compact saved input) all give the same entries."""
    from gps_ds.sparse.triton_kernels import sampled_triton

    gen = torch.Generator().manual_seed(3)
    m, r, c, k = 150, 40, 64, 2
    g = torch.randn(r, m, generator=gen).to(dtype).to(DEVICE).t()  # strides (1, m)
    x = torch.randn(m, c, generator=gen).to(dtype).to(DEVICE)
    idx = random_indices(r, c, k, generator=gen).to(DEVICE)
    ref = _reference(g, x, idx, None)
    for splits in (1, 3, 7):
        out = sampled_triton(g, x, idx, None, splits=splits)
        assert (out.double() - ref).abs().max().item() <= _tolerance(ref, m), splits


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_linear_backward_through_triton(dtype):
    """SparseLinear with linear_grad="triton": the values' gradient equals the float64 dense weight
    gradient at the selected entries; input and bias gradients are unchanged."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 24).to(DEVICE)
    idx = random_indices(24, 48, 4, generator=torch.Generator().manual_seed(1), pad=True)
    x = torch.randn(5, 7, 48, device=DEVICE).to(dtype)
    ref = nn.Linear(48, 24).to(DEVICE).double()
    ref.load_state_dict(lin.state_dict())
    apply_sparse(lin, {"weight": idx})
    lin.to(dtype)
    with kernel_settings(linear_grad="triton"):
        y = lin(x)
        y.float().square().sum().backward()
    xr = x.detach().double().requires_grad_(True)
    # the effective weight (base with the selected entries in gps_values), rounded like the module's
    ref.weight.data.copy_(merged_weight(lin).detach().double())
    ref.bias.data.copy_(lin.bias.detach().double())
    ref(xr).square().sum().backward()
    valid = idx >= 0
    want = ref.weight.grad.gather(1, idx.clamp(min=0).to(DEVICE)).masked_fill(~valid.to(DEVICE), 0)
    got = lin.gps_values.grad.double()
    scale = float(want.abs().max())
    tol = 2e-2 * scale if dtype == torch.bfloat16 else 1e-4 * scale  # bf16: y itself is rounded to bf16
    assert (got - want).abs().max().item() <= tol


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geo", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=4, stride=4, padding=0)])
def test_conv_kernel_matches_float64(dtype, geo):
    from gps_ds.sparse.conv_kernels import ConvGeometry
    from gps_ds.sparse.indices import build_plan
    from gps_ds.sparse.triton_kernels import conv_grad_triton

    gen = torch.Generator().manual_seed(5)
    n, c, r, h = 3, 5, 12, 12
    kk = geo["kernel_size"]
    x = torch.randn(n, c, h, h, generator=gen).to(dtype)
    w = torch.randn(r, c, kk, kk, generator=gen)
    ho = (h + 2 * geo["padding"] - kk) // geo["stride"] + 1
    g = torch.randn(n, r, ho, ho, generator=gen).to(dtype)
    raw = random_indices(r, c * kk * kk, 3, generator=gen, pad=True)
    valid = raw >= 0
    plan = build_plan(raw.clamp(min=0).to(DEVICE), valid.to(DEVICE), c * kk * kk, 0.0)
    cg = ConvGeometry((kk, kk), (geo["stride"],) * 2, (geo["padding"],) * 2, (1, 1), 1)
    chunk = S.chunk_elems(DEVICE, 2) if CUDA else 300  # small chunks on CPU: several batch chunks
    out = conv_grad_triton(g.to(DEVICE), x.to(DEVICE), plan, cg, chunk)
    gw = torch.nn.grad.conv2d_weight(x.double(), w.shape, g.double(), stride=geo["stride"], padding=geo["padding"])
    ref = gw.reshape(r, -1).gather(1, raw.clamp(min=0)).masked_fill(~valid, 0)
    m = n * ho * ho
    assert (out.double().cpu() - ref).abs().max().item() <= _tolerance(ref, m)


def test_cuda_rules_never_dense_at_small_k(monkeypatch):
    """CUDA rule table: K <= 10 takes a sampled path in every dtype (Triton where it runs, else the
    gather); past the table a large K on a narrow layer goes dense. Runs without a GPU (the rules
    only read the device type)."""
    from gps_ds.sparse import triton_kernels

    cuda = torch.device("cuda")
    m = 64 * 197
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        monkeypatch.setattr(triton_kernels, "available", lambda device=None: True)
        for k in range(1, 11):
            for rows, cols in ((2304, 768), (768, 3072), (1000, 768), (64, 64)):
                assert S.choose_linear_grad(m, rows, k, cols, dtype, cuda) == "triton", (dtype, k, rows)
        assert S.choose_conv_grad(64, 3, 768, 4, 196, 256, 1, dtype, cuda) == "triton"  # patch embedding
        assert S.choose_conv_grad(8, 96, 96, 4, 56 * 56, 49, 96, dtype, cuda) == "gather"  # depthwise
        monkeypatch.setattr(triton_kernels, "available", lambda device=None: False)
        assert S.choose_linear_grad(m, 2304, 10, 768, dtype, cuda) == "gather"
    assert S.choose_linear_grad(m, 2304, 50, 768, torch.bfloat16, cuda) == "dense"  # 50 * 400 >= 768
    assert S.choose_linear_grad(m, 2304, 4, 768, torch.float64, cuda) == "gather"  # no fp64 Triton
    # CPU rules never pick Triton
    assert S.choose_linear_grad(m, 2304, 1, 768, torch.float32, torch.device("cpu")) != "triton"


def test_bench_kernels_rows(capsys):
    """`gps-ds bench kernels` on tiny ViT-like shapes: every path's entries agree with float64 (the
    bench's own error column, checked here against a bound), the rule's pick is one of the timed
    paths; under the interpreter the triton path is among them."""
    from gps_ds.bench.kernels import bench_kernels
    from gps_ds.cli import run

    layers = (("a", 24, 16), ("b", 8, 40))
    r = bench_kernels("cpu", batch=1, tokens=6, ks=(1, 3), dtypes=("float32", "bfloat16"), layers=layers, reps=1,
                      warmup=0, conv=(4, 16, 8))
    assert len(r["rows"]) == 2 * (2 * 2 + 2)  # per dtype: 2 layers x 2 K + the patch embedding x 2 K
    assert sum("unfold" in row["ms"] for row in r["rows"]) == 4
    for row in r["rows"]:
        assert {"dense", "gather"} <= set(row["ms"]) and row["auto"] in row["ms"] and row["fastest"] in row["ms"]
        assert ("triton" in row["ms"]) == INTERPRET
        bound = 1e-5 if row["dtype"] == "float32" else 2e-2  # bf16 gather / dense round products to bf16
        assert max(row["rel_error"].values()) <= bound, row
        if "triton" in row["ms"]:
            assert row["rel_error"]["triton"] <= 1e-5  # fp32 products and sums, also for bf16 inputs
    assert run(["bench", "kernels", "--ks", "1,x"]) == 2
    assert "--ks: expected a comma list of integers" in capsys.readouterr().err


def test_cpu_tensors_refused_without_interpreter():
    from gps_ds.sparse import triton_kernels

    if INTERPRET:
        pytest.skip("this process runs the interpreter")
    assert "TRITON_INTERPRET=1" in (triton_kernels.unavailable_reason("cpu") or "")
    g = torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_kernels.sampled_triton(g, torch.zeros(4, 5), torch.zeros(3, 1, dtype=torch.long), None)


@pytest.mark.skipif(CUDA or INTERPRET, reason="the kernel tests run in this process (CUDA or interpreter)")
def test_interpreter_on_cpu():
    """Runs the kernel tests above on CPU tensors through Triton's interpreter in a subprocess."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not interpreter_on_cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=540,
                          cwd=Path(__file__).resolve().parents[1])
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    # every kernel test ran: 6 linear + 2 splits + 2 module + 4 conv + the rule test + the bench rows
    # (the refusal test skips itself under the interpreter)
    last = proc.stdout.strip().splitlines()[-1]
    assert "16 passed, 1 skipped" in last, tail
