"""Kernel-path rules, the in-place weight write, no-grad / inference paths and dtypes."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gps_ds.sparse import apply_sparse, kernel_settings, merged_weight
from gps_ds.sparse.indices import build_plan
from gps_ds.sparse.linear_kernels import written_weight
from gps_ds.sparse.settings import choose_conv_grad, choose_linear_grad, choose_weight_path
from gps_ds.sparse.testing import random_indices

CPU = torch.device("cpu")
F32 = torch.float32


def test_linear_rules_follow_measured_crossovers(monkeypatch):
    from gps_ds.sparse import native

    m = 16 * 197  # ViT, batch 16
    assert native.available()
    assert choose_linear_grad(m, 2304, 1, 768, F32, CPU, threads=1) == "fused"  # ViT-B qkv, K=1
    assert choose_linear_grad(m, 1152, 10, 384, F32, CPU, threads=1) == "sddmm"  # ViT-S qkv, K=10, 1 thread
    assert choose_linear_grad(m, 1152, 10, 384, F32, CPU, threads=2) == "fused"  # sampled_addmm does not scale
    assert choose_linear_grad(m, 64, 60, 64, F32, CPU) == "dense"  # K close to fan_in
    assert choose_linear_grad(10, 192, 2, 64, F32, CPU) == "dense"  # tiny layer: fixed costs decide
    assert choose_linear_grad(m, 1152, 10, 384, torch.bfloat16, CPU) in ("gather", "dense")  # no bf16 sddmm/fused
    monkeypatch.setattr(native, "available", lambda: False)  # no C compiler: the torch paths
    assert choose_linear_grad(m, 2304, 1, 768, F32, CPU, threads=1) == "gather"
    assert choose_weight_path("auto", 1, 1000, 1, 768) == "merge"
    with kernel_settings(linear_grad="dense"):
        assert choose_linear_grad(m, 2304, 1, 768, F32, CPU) == "dense"
    with pytest.raises(ValueError):
        with kernel_settings(linear_grad="nope"):
            pass


def test_conv_rules_follow_measured_crossovers():
    # ConvNeXt 7x7 depthwise: the dense grouped weight gradient is slow on CPU
    assert choose_conv_grad(8, 96, 96, 1, 56 * 56, 49, 96, F32, CPU) == "gather"
    # ViT patch embedding with large K: the patch matrix is cheap (stride == kernel)
    assert choose_conv_grad(16, 3, 384, 8, 196, 256, 1, F32, CPU) == "unfold"
    # dense small conv with every entry selected
    assert choose_conv_grad(8, 96, 192, 384, 28 * 28, 4, 1, F32, CPU) == "dense"


def test_written_weight_restores_base_bit_exactly():
    torch.manual_seed(0)
    lin = nn.Linear(10, 6)
    apply_sparse(lin, {"weight": random_indices(6, 10, 3, pad=True)})
    base = lin.weight.detach().clone()
    version = lin.weight._version
    plan = lin._plan()
    expected = merged_weight(lin)
    with written_weight(lin.weight, lin.gps_values, plan, torch.float32) as w:
        assert torch.equal(w, expected)
    assert torch.equal(lin.weight, base) and lin.weight._version == version
    with pytest.raises(RuntimeError, match="boom"):
        with written_weight(lin.weight, lin.gps_values, plan, torch.float32):
            raise RuntimeError("boom")
    assert torch.equal(lin.weight, base)
    x = torch.randn(4, 10, requires_grad=True)
    lin(x).sum().backward()
    assert torch.equal(lin.weight, base)


def test_no_grad_and_inference_mode_match_training_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 25, 3))
    apply_sparse(model, {"0.weight": random_indices(4, 27, 2), "2.weight": random_indices(3, 100, 4, pad=True)})
    x = torch.randn(2, 3, 5, 5)
    y = model(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), y.detach())


def test_compact_saving_keeps_only_selected_columns():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8)
    idx = torch.tensor([[3, 9]] * 4 + [[9, 40]] * 4)
    apply_sparse(lin, {"weight": idx})
    plan = build_plan(lin.gps_indices, None, 64, 0.5)
    assert plan.cols.tolist() == [3, 9, 40]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lin(torch.randn(5, 7, 64))
    assert any(t.shape == (35, 3) for t in saved)  # (positions, distinct columns), not (5, 7, 64)
    y.sum().backward()


def test_low_precision_weights_with_fp32_values():
    torch.manual_seed(0)
    lin = nn.Linear(16, 6).to(torch.bfloat16)
    idx = random_indices(6, 16, 2)
    apply_sparse(lin, {"weight": idx}, values_dtype=torch.float32)
    assert lin.gps_values.dtype == torch.float32 and lin.weight.dtype == torch.bfloat16
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lin.gps_values.grad.dtype == torch.float32
    w = merged_weight(lin).float().requires_grad_(True)
    F.linear(x.detach().float(), w, lin.bias.float()).sum().backward()
    ref = w.grad.gather(1, idx)
    torch.testing.assert_close(lin.gps_values.grad, ref, rtol=2e-2, atol=2e-2)


def test_autocast_conv_cpu():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)
    apply_sparse(conv, {"weight": random_indices(4, 27, 2)})
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and conv.gps_values.grad.dtype == torch.float32


@pytest.mark.parametrize("parts", [2, 3])
def test_gather_split_over_cpu_threads_matches_dense(parts):
    # Large enough that every part gets MIN_PART_ELEMS multiply-adds: the threaded path runs.
    from gps_ds.sparse.cpu_threads import MIN_PART_ELEMS, parts_for
    from gps_ds.sparse.linear_kernels import sampled_dense, sampled_gather
    from gps_ds.sparse.settings import kernel_settings

    g = torch.Generator().manual_seed(0)
    m, r, c, k = 1100, 800, 300, 2
    g2, x2 = torch.randn(m, r, generator=g), torch.randn(m, c, generator=g)
    idx = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(r)])
    valid = torch.rand(r, k, generator=g) > 0.1
    with kernel_settings(cpu_parts=parts):
        assert parts_for(torch.device("cpu"), m * r * k) == parts and m * r * k >= parts * MIN_PART_ELEMS
        split = sampled_gather(g2, x2, idx, valid, chunk_elems=50_000)
        again = sampled_gather(g2, x2, idx, valid, chunk_elems=50_000)
    with kernel_settings(cpu_parts=1):
        whole = sampled_gather(g2, x2, idx, valid, chunk_elems=50_000)
    torch.testing.assert_close(split, sampled_dense(g2.double(), x2.double(), idx, valid).float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-4)
    assert torch.equal(split, again)  # combined in a fixed order: no dependence on thread timing
