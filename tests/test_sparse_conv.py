"""SparseConv2d against F.conv2d with a requires_grad weight, for every kernel path."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gps_ds.sparse import SelectionError, SparseConv2d, apply_sparse, kernel_settings, merged_weight
from gps_ds.sparse.settings import CONV_GRAD_PATHS
from gps_ds.sparse.testing import random_indices

from test_sparse_linear import dense_grads, expected_weight

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

# (in, out, kernel, stride, padding, dilation, groups, bias, input H, W)
GEOMETRIES = {
    "3x3_s2_p1": (4, 6, 3, 2, 1, 1, 1, True, 9, 8),
    "3x3_dil2": (3, 5, 3, 1, 2, 2, 1, True, 9, 9),
    "groups2": (4, 6, 3, 1, 1, 1, 2, False, 7, 7),
    "depthwise3": (6, 6, 3, 1, 1, 1, 6, True, 8, 8),
    "depthwise7": (4, 4, 7, 1, 3, 1, 4, True, 9, 9),
    "depthwise_mult": (3, 6, 3, 2, 1, 1, 3, True, 8, 8),
    "same_even": (3, 4, 4, 1, "same", 1, 1, True, 7, 6),
    "same_dil": (3, 4, 3, 1, "same", 2, 1, True, 7, 7),
    "valid": (3, 4, (3, 2), 1, "valid", 1, 1, True, 6, 7),
    "rect_s21": (3, 4, (3, 2), (2, 1), (1, 0), 1, 1, True, 8, 7),
    "patchify": (3, 8, 4, 4, 0, 1, 1, True, 8, 8),
}


def make_sparse_conv(geo, k, pad, seed=0):
    cin, cout, ks, stride, padding, dilation, groups, bias, _, _ = geo
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, ks, stride, padding, dilation, groups, bias)
    original = conv.weight.detach().clone()
    fan_in = original[0].numel()
    idx = random_indices(cout, fan_in, min(k, fan_in), generator=torch.Generator().manual_seed(seed), pad=pad)
    apply_sparse(conv, {"weight": idx})
    with torch.no_grad():
        conv.gps_values.copy_(torch.randn_like(conv.gps_values) * (idx >= 0))
    return conv, original, idx


def conv_fn(conv):
    return lambda x, w, b: F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


@pytest.mark.parametrize("path", CONV_GRAD_PATHS)
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("pad", [False, True])
def test_conv_matches_dense(path, name, pad):
    geo = GEOMETRIES[name]
    conv, original, idx = make_sparse_conv(geo, k=3, pad=pad)
    x = torch.randn(2, geo[0], geo[8], geo[9])
    with torch.no_grad():
        g = torch.randn_like(conv(x))
    with kernel_settings(conv_grad=path, chunk_bytes=256):  # tiny chunks: every loop runs
        xs = x.clone().requires_grad_(True)
        y = conv(xs)
        y.backward(g)
    w_eff = expected_weight(original, idx, conv.gps_values.detach())
    y_ref, gx_ref, gv_ref, gb_ref = dense_grads(w_eff, conv.bias, x, g, idx, conv_fn(conv))
    torch.testing.assert_close(merged_weight(conv), w_eff, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs.grad, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.gps_values.grad, gv_ref, rtol=1e-5, atol=1e-5)
    if gb_ref is not None:
        torch.testing.assert_close(conv.bias.grad, gb_ref, rtol=1e-5, atol=1e-5)
    assert conv.weight.grad is None


@pytest.mark.parametrize("path", CONV_GRAD_PATHS)
def test_conv_large_k_unbatched_and_frozen_input(path):
    geo = GEOMETRIES["3x3_s2_p1"]
    conv, original, idx = make_sparse_conv(geo, k=36, pad=False)  # K == fan_in
    x = torch.randn(geo[0], 9, 8)  # unbatched input, no input grad (first layer)
    with kernel_settings(conv_grad=path):
        y = conv(x)
        y.backward(torch.ones_like(y))
    assert y.dim() == 3
    w_eff = expected_weight(original, idx, conv.gps_values.detach())
    y_ref, _, gv_ref, _ = dense_grads(w_eff, conv.bias, x.unsqueeze(0), torch.ones(1, *y.shape), idx, conv_fn(conv))
    torch.testing.assert_close(y, y_ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.gps_values.grad, gv_ref, rtol=1e-5, atol=1e-5)


def test_conv_auto_path_channels_last():
    geo = GEOMETRIES["depthwise7"]
    conv, original, idx = make_sparse_conv(geo, k=2, pad=True)
    x = torch.randn(3, 4, 9, 9).to(memory_format=torch.channels_last)
    xs = x.clone().requires_grad_(True)
    y = conv(xs)
    g = torch.randn_like(y)
    y.backward(g)
    w_eff = expected_weight(original, idx, conv.gps_values.detach())
    _, gx_ref, gv_ref, _ = dense_grads(w_eff, conv.bias, x, g, idx, conv_fn(conv))
    torch.testing.assert_close(xs.grad, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.gps_values.grad, gv_ref, rtol=1e-5, atol=1e-5)


def test_conv_module_type_and_padding_mode_error():
    conv, _, _ = make_sparse_conv(GEOMETRIES["groups2"], 2, False)
    assert isinstance(conv, SparseConv2d) and isinstance(conv, nn.Conv2d)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="0.weight.*padding_mode"):
        apply_sparse(model, {"0.weight": random_indices(4, 27, 2)})
    with pytest.raises(SelectionError, match="0.weight"):
        apply_sparse(nn.Sequential(nn.Conv2d(3, 4, 3)), {"0.weight": random_indices(5, 27, 2)})
