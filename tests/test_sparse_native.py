"""The fused C gather kernel: numbers against a dense float64 product, threads, strides,
fallbacks, and its build cache (rebuilt when damaged; absent compiler -> torch kernels).

The numeric tests run on any machine: without a C compiler ``sampled_fused`` takes the torch
gather and must give the same numbers.  The tests that need the compiled library are skipped,
by name, where no compiler exists (``needs_cc``); the fresh-machine path with no compiler at
all is tested explicitly (``test_fresh_machine_without_any_compiler``) wherever this runs.
"""

import os
import shutil

import pytest
import torch

from gps_ds.sparse import kernel_settings, native
from gps_ds.sparse.linear_kernels import fused_index, sampled_dense, sampled_fused, sampled_gather

_CC = native._compiler()  # $CC, else cc / gcc / clang on PATH
HAVE_CC = _CC is not None and shutil.which(_CC) is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler (cc, gcc, clang or $CC): the fused kernel "
                                                  "cannot be built here; the torch fallback is tested instead")


@pytest.fixture
def fresh_native(tmp_path, monkeypatch):
    """A private kernel cache; the process-wide library state is restored afterwards."""
    monkeypatch.setenv("GPS_DS_KERNEL_CACHE", str(tmp_path / "kernels"))
    saved = dict(native._state)
    native.reset()
    yield tmp_path / "kernels"
    native.reset()
    native._state.update(saved)


def problem(m, r, c, k, pad, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    g2 = torch.randn(m, r, generator=g, dtype=torch.float64).to(dtype)
    x2 = torch.randn(m, c, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(r)])
    valid = (torch.rand(r, k, generator=g) > 0.2) if pad else None
    if valid is not None:
        idx = idx.masked_fill(~valid, 0)
    return g2, x2, idx, valid


def reference(g2, x2, idx, valid):
    return sampled_dense(g2.double(), x2.double(), idx, valid)


@pytest.mark.parametrize("m,r,c,k", [(1, 5, 7, 1), (129, 33, 20, 3), (300, 700, 64, 2), (2000, 513, 96, 10)])
@pytest.mark.parametrize("pad", [False, True])
def test_fused_matches_dense_float64_reference(m, r, c, k, pad):
    g2, x2, idx, valid = problem(m, r, c, k, pad)
    out = sampled_fused(g2, x2, idx, valid)
    assert out.dtype == torch.float32 and out.shape == (r, k)
    torch.testing.assert_close(out.double(), reference(g2, x2, idx, valid), rtol=1e-5, atol=1e-4)
    if pad:
        assert (out[~valid] == 0).all()


@pytest.mark.parametrize("parts", [1, 2])
def test_fused_bias_gradient_in_the_same_pass(parts):
    from gps_ds.sparse.linear_kernels import fused_grads

    g2, x2, idx, valid = problem(1500, 700, 90, 1, True)
    with kernel_settings(cpu_parts=parts):
        values, bias = fused_grads(g2, x2, idx, valid)
    torch.testing.assert_close(values.double(), reference(g2, x2, idx, valid), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bias.double(), g2.double().sum(0), rtol=1e-5, atol=1e-4)
    assert fused_grads(g2, x2, idx, valid, bias=False)[1] is None


def test_fused_float64_is_exact_to_rounding():
    g2, x2, idx, valid = problem(1000, 300, 50, 4, True, dtype=torch.float64)
    out = sampled_fused(g2, x2, idx, valid)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(g2, x2, idx, valid), rtol=1e-12, atol=1e-11)


def test_fused_reads_strided_operands():
    g2, x2, idx, valid = problem(400, 90, 30, 2, False)
    wide_x = torch.randn(400, 50)
    wide_x[:, 10:40] = x2
    g_t = g2.t().contiguous().t()  # column-major: unit row stride, the kernel copies it
    out = sampled_fused(g_t, wide_x[:, 10:40], idx, valid)  # row stride 50 > width 30
    torch.testing.assert_close(out.double(), reference(g2, x2, idx, valid), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("parts", [2, 3])
def test_fused_split_over_threads_is_deterministic(parts):
    g2, x2, idx, valid = problem(1500, 800, 120, 2, True)  # enough work for every part
    with kernel_settings(cpu_parts=parts):
        split, again = sampled_fused(g2, x2, idx, valid), sampled_fused(g2, x2, idx, valid)
    with kernel_settings(cpu_parts=1):
        whole = sampled_fused(g2, x2, idx, valid)
    assert torch.equal(split, again)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(split.double(), reference(g2, x2, idx, valid), rtol=1e-5, atol=1e-4)


def test_half_precision_takes_the_torch_gather():
    g2, x2, idx, valid = problem(64, 40, 16, 2, False, dtype=torch.bfloat16)
    torch.testing.assert_close(sampled_fused(g2, x2, idx, valid), sampled_gather(g2, x2, idx, valid, 1 << 20))


def test_index_table_is_range_checked():
    with pytest.raises(ValueError, match=r"out of range \[0, 8\)"):
        fused_index(torch.tensor([[0], [8]]), 8)
    assert fused_index(torch.tensor([[1, 2], [3, 4]]), 8).tolist() == [[1, 3], [2, 4]]


LOAD_AND_CHECK = """
import torch
from gps_ds.sparse import native
from gps_ds.sparse.linear_kernels import sampled_dense, sampled_fused
assert native.available(), native.unavailable_reason()
g = torch.Generator().manual_seed(0)
g2, x2 = torch.randn(300, 40, generator=g), torch.randn(300, 12, generator=g)
idx = torch.randint(0, 12, (40, 2), generator=g)
ref = sampled_dense(g2.double(), x2.double(), idx, None)
torch.testing.assert_close(sampled_fused(g2, x2, idx, None).double(), ref, rtol=1e-5, atol=1e-4)
"""


@needs_cc
def test_cache_is_built_once_and_rebuilt_when_damaged(tmp_path):
    # Separate processes: a process keeps a loaded library mapped, so damage is only seen
    # by the next one (a rebuild replaces the file by rename, never in place).
    import subprocess
    import sys

    env = {**os.environ, "GPS_DS_KERNEL_CACHE": str(tmp_path)}
    env.pop("GPS_DS_NO_NATIVE", None)

    def run():
        done = subprocess.run([sys.executable, "-c", LOAD_AND_CHECK], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        (lib,) = tmp_path.glob("fused_gather-*.so")
        assert not list(tmp_path.glob(".build-*"))  # built under a temporary name, then renamed
        return lib, lib.stat().st_ino

    lib, first = run()
    assert run() == (lib, first)  # the second process loads the cached library
    lib.write_bytes(b"not a shared library")
    again, rebuilt = run()
    assert again == lib and rebuilt != first


def test_without_a_compiler_the_torch_kernels_run(fresh_native, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(fresh_native / "no-such-cc"))
    assert not native.available()
    assert "no-such-cc" in native.unavailable_reason()
    g2, x2, idx, valid = problem(60, 30, 12, 2, True)
    with kernel_settings(linear_grad="fused"):
        out = sampled_fused(g2, x2, idx, valid)
    torch.testing.assert_close(out.double(), reference(g2, x2, idx, valid), rtol=1e-5, atol=1e-4)
    assert not fresh_native.exists() or not list(fresh_native.glob("*.so"))


@needs_cc
def test_compile_error_is_reported_and_leaves_no_file(fresh_native, monkeypatch):
    monkeypatch.setattr(native, "compile_flags", lambda: ["-O3", "-fPIC", "-shared", "--no-such-flag"])
    assert not native.available()
    assert "failed" in native.unavailable_reason()
    assert not list(fresh_native.glob("*.so")) and not list(fresh_native.glob(".build-*"))


def test_switched_off_by_environment(fresh_native, monkeypatch):
    monkeypatch.setenv("GPS_DS_NO_NATIVE", "1")
    assert not native.available() and "GPS_DS_NO_NATIVE" in native.unavailable_reason()
    with pytest.raises(native.NativeUnavailable, match="GPS_DS_NO_NATIVE"):
        native.load()
    # Nothing was compiled or loaded, and the fused entry point still gives the right numbers.
    assert "lib" not in native._state
    assert not fresh_native.exists() or not list(fresh_native.iterdir())
    g2, x2, idx, valid = problem(80, 30, 12, 2, True)
    torch.testing.assert_close(sampled_fused(g2, x2, idx, valid).double(), reference(g2, x2, idx, valid),
                               rtol=1e-5, atol=1e-4)
    if HAVE_CC:  # the switch, not the machine, turned it off: "0" turns it back on
        monkeypatch.setenv("GPS_DS_NO_NATIVE", "0")
        native.reset()
        assert native.available() and list(fresh_native.glob("fused_gather-*.so"))


def _fused_cheapest_shape():
    """A Linear shape whose selected-entry gradient the cost model gives to "fused" when the
    kernel exists (ViT-B MLP-like: many positions, wide input, K=2)."""
    return dict(positions=4096, rows=3072, k=2, cols=768, dtype=torch.float32, device=torch.device("cpu"), threads=1)


def test_fresh_machine_without_any_compiler(fresh_native, monkeypatch, tmp_path):
    """No $CC and no cc/gcc/clang on PATH (a fresh machine): the kernel reports why it is
    unavailable, "auto" never picks it, a forced "fused" runs the torch gather, and a sparse
    Linear trains with gradients equal to a float64 dense reference."""
    from gps_ds.sparse.modules import SparseLinear
    from gps_ds.sparse.settings import choose_linear_grad

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("GPS_DS_NO_NATIVE", raising=False)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert all(shutil.which(c) is None for c in ("cc", "gcc", "clang"))
    assert not native.available()
    assert "no C compiler found" in native.unavailable_reason()
    with pytest.raises(native.NativeUnavailable, match="no C compiler"):
        native.load()
    assert not fresh_native.exists() or not list(fresh_native.iterdir())
    with kernel_settings(linear_grad="auto"):
        assert choose_linear_grad(**_fused_cheapest_shape()) != "fused"

    torch.manual_seed(0)
    idx = torch.stack([torch.randperm(24)[:3].sort().values for _ in range(10)])
    lin = SparseLinear(24, 10, idx)
    x = torch.randn(7, 5, 24)
    with kernel_settings(linear_grad="fused"):
        lin(x).square().sum().backward()
    # Reference: the same Linear, dense, in float64; its weight gradient at the selected entries.
    w = lin.weight.detach().double().clone()
    w.scatter_(1, idx, lin.gps_values.detach().double())
    w.requires_grad_(True)
    b = lin.bias.detach().double().clone().requires_grad_(True)
    torch.nn.functional.linear(x.double(), w, b).square().sum().backward()
    torch.testing.assert_close(lin.gps_values.grad.double(), w.grad.gather(1, idx), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lin.bias.grad.double(), b.grad, rtol=1e-5, atol=1e-4)
    assert lin.weight.grad is None


@needs_cc
def test_cost_model_picks_fused_when_the_kernel_exists(fresh_native):
    """The counterpart of the no-compiler test: the same shape goes to "fused" when it exists."""
    from gps_ds.sparse.settings import choose_linear_grad

    assert native.available(), native.unavailable_reason()
    with kernel_settings(linear_grad="auto"):
        assert choose_linear_grad(**_fused_cheapest_shape()) == "fused"
