"""SparseLinear against independent dense computations, for every kernel path."""

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gps_ds.sparse import (
    SelectionError,
    SparseLinear,
    apply_sparse,
    kernel_settings,
    merged_weight,
    sparse_values,
)
from gps_ds.sparse.settings import LINEAR_GRAD_PATHS, WEIGHT_PATHS
from gps_ds.sparse.testing import random_indices


def expected_weight(original: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Hand-built effective weight: original everywhere, values at the valid selected slots."""
    w = original.detach().clone().reshape(original.shape[0], -1)
    for r, k in itertools.product(range(idx.shape[0]), range(idx.shape[1])):
        if idx[r, k] >= 0:
            w[r, idx[r, k]] = values[r, k]
    return w.view(original.shape)


def dense_grads(weight, bias, x, grad_out, idx, fn):
    """Reference: dense autograd with a requires_grad weight, gathered at the indices."""
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    y = fn(xr, w, b)
    y.backward(grad_out)
    valid = idx >= 0
    gv = w.grad.reshape(w.shape[0], -1).gather(1, idx.clamp(min=0)) * valid
    return y.detach(), xr.grad, gv, None if b is None else b.grad


def make_sparse_linear(in_f, out_f, k, pad, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    original = lin.weight.detach().clone()
    idx = random_indices(out_f, in_f, k, generator=torch.Generator().manual_seed(seed), pad=pad)
    apply_sparse(lin, {"weight": idx})
    with torch.no_grad():  # values different from the original weights
        lin.gps_values.copy_(torch.randn_like(lin.gps_values) * (idx >= 0))
    return lin, original, idx


@pytest.mark.parametrize("grad_path", LINEAR_GRAD_PATHS)
@pytest.mark.parametrize("weight_path", WEIGHT_PATHS)
@pytest.mark.parametrize("x_shape", [(6,), (3, 5)])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("compact", [0.0, 1.0])
@pytest.mark.parametrize("chunk_bytes", [None, 64])
def test_linear_matches_dense(grad_path, weight_path, x_shape, pad, compact, chunk_bytes):
    in_f, out_f, k = 20, 9, 3
    lin, original, idx = make_sparse_linear(in_f, out_f, k, pad)
    x = torch.randn(*x_shape, in_f, dtype=torch.float64).float()
    g = torch.randn(*x_shape, out_f)
    settings = dict(
        linear_grad=grad_path, forward=weight_path, input_grad=weight_path, compact_ratio=compact, chunk_bytes=chunk_bytes
    )
    with kernel_settings(**settings):
        xs = x.clone().requires_grad_(True)
        y = lin(xs)
        y.backward(g)
    w_eff = expected_weight(original, idx, lin.gps_values.detach())
    y_ref, gx_ref, gv_ref, gb_ref = dense_grads(w_eff, lin.bias, x, g, idx, F.linear)
    torch.testing.assert_close(merged_weight(lin), w_eff, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs.grad, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.gps_values.grad, gv_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.bias.grad, gb_ref, rtol=1e-5, atol=1e-5)
    assert lin.weight.grad is None and not lin.weight.requires_grad
    assert lin.gps_values.grad.shape == (out_f, k)
    if pad:
        assert (lin.gps_values.grad[idx < 0] == 0).all()


@pytest.mark.parametrize("grad_path", LINEAR_GRAD_PATHS)
def test_linear_large_k_and_k_zero(grad_path):
    for k in (0, 16):  # K == fan_in: every entry selected
        lin, original, idx = make_sparse_linear(16, 5, k, pad=False, bias=False)
        x = torch.randn(7, 16)
        g = torch.randn(7, 5)
        with kernel_settings(linear_grad=grad_path):
            xs = x.clone().requires_grad_(True)
            lin(xs).backward(g)
        w_eff = expected_weight(original, idx, lin.gps_values.detach())
        _, gx_ref, gv_ref, _ = dense_grads(w_eff, None, x, g, idx, F.linear)
        torch.testing.assert_close(xs.grad, gx_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lin.gps_values.grad, gv_ref, rtol=1e-5, atol=1e-5)


def test_linear_auto_paths_and_input_without_grad():
    lin, original, idx = make_sparse_linear(32, 24, 2, pad=True)
    x = torch.randn(4, 10, 32)
    g = torch.randn(4, 10, 24)
    lin(x).backward(g)  # x does not require grad: only values / bias grads
    w_eff = expected_weight(original, idx, lin.gps_values.detach())
    _, _, gv_ref, gb_ref = dense_grads(w_eff, lin.bias, x, g, idx, F.linear)
    torch.testing.assert_close(lin.gps_values.grad, gv_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.bias.grad, gb_ref, rtol=1e-5, atol=1e-5)


def test_linear_apply_keeps_names_and_values():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bias_obj = model[0].bias
    idx = random_indices(6, 8, 2, generator=torch.Generator().manual_seed(0))
    idx_pad = idx.clone()
    idx_pad[1, 1] = -1
    apply_sparse(model, {"0.weight": idx_pad.to(torch.int32)})
    m = model[0]
    assert isinstance(m, SparseLinear) and isinstance(m, nn.Linear)
    assert model[0].bias is bias_obj
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "0.gps_values", "2.weight", "2.bias"]
    assert {n for n, _ in model.named_buffers()} == {"0.gps_indices", "0.gps_valid"}
    assert m.gps_indices.dtype == torch.int64
    valid = idx_pad >= 0
    # values are the original weights themselves; the base is zero there
    torch.testing.assert_close(m.gps_values.detach()[valid], before["0.weight"].gather(1, idx)[valid])
    assert (m.weight.detach().gather(1, idx)[valid] == 0).all()
    assert m.weight.detach()[1, idx[1, 1]] == before["0.weight"][1, idx[1, 1]]  # padded slot untouched
    torch.testing.assert_close(merged_weight(m), before["0.weight"], rtol=0, atol=0)
    vals = sparse_values(model)
    assert list(vals) == ["0.weight"]
    i32, v32 = vals["0.weight"]
    assert i32.dtype == torch.int32 and v32.dtype == torch.float32
    assert torch.equal(i32, idx_pad.to(torch.int32)) and v32[1, 1] == 0
    # no padding anywhere -> no gps_valid buffer
    model2 = nn.Linear(8, 6)
    apply_sparse(model2, {"weight": idx})
    assert "gps_valid" not in dict(model2.named_buffers())


def test_linear_state_dict_roundtrip_and_index_reload():
    lin, _, idx = make_sparse_linear(12, 5, 3, pad=True)
    other, _, _ = make_sparse_linear(12, 5, 3, pad=True, seed=7)
    x = torch.randn(3, 12)
    other.load_state_dict(lin.state_dict())  # copies into buffers: cached index plan must refresh
    torch.testing.assert_close(other(x), lin(x))


def test_linear_saves_parameters_not_dense_copies():
    """ZeRO-3 contract: the only weight-sized tensor saved for backward is the Parameter itself."""
    lin, _, _ = make_sparse_linear(16, 12, 2, pad=False)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lin(torch.randn(5, 16, requires_grad=True))
    dense = [t for t in saved if t.shape == lin.weight.shape]
    assert dense and all(t is lin.weight for t in dense)
    assert any(t is lin.gps_values for t in saved)
    y.sum().backward()


def test_linear_gathers_zero3_partitioned_params_in_backward():
    lin, _, _ = make_sparse_linear(10, 4, 2, pad=False)
    calls = []

    class Status:
        name = "AVAILABLE"

    for p in (lin.weight, lin.gps_values, lin.bias):
        p.ds_status = Status()
        p.all_gather = lambda p=p: (calls.append(("gather", p.shape)), setattr(p.ds_status, "name", "AVAILABLE"))
        p.partition = lambda p=p: calls.append(("partition", p.shape))
    y = lin(torch.randn(3, 10, requires_grad=True))
    assert calls == []
    for p in (lin.weight, lin.gps_values, lin.bias):
        p.ds_status = Status()
        p.ds_status.name = "NOT_AVAILABLE"
    y.sum().backward()
    assert [c[0] for c in calls].count("gather") == 3
    assert [c[0] for c in calls].count("partition") == 3


def test_linear_autocast_bf16_cpu():
    lin, original, idx = make_sparse_linear(16, 8, 2, pad=True)
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lin.gps_values.grad.dtype == torch.float32
    w_eff = expected_weight(original, idx, lin.gps_values.detach())
    _, gx_ref, gv_ref, _ = dense_grads(w_eff, lin.bias, x, torch.ones(4, 8), idx, F.linear)
    torch.testing.assert_close(x.grad, gx_ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(lin.gps_values.grad, gv_ref, rtol=3e-2, atol=3e-2)


def test_selection_errors_name_the_parameter():
    model = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6))
    ok = random_indices(6, 8, 2)
    cases = {
        "out of range": {"0.weight": ok.clone().index_fill_(0, torch.tensor([2]), 8)},
        "does not fit": {"0.weight": ok[:5]},
        "not a parameter": {"1.nope": ok},
        "nn.Linear or nn.Conv2d": {"1.weight": ok},
        "not sorted": {"0.weight": ok.flip(1)},
        "padding before": {"0.weight": torch.cat([torch.full((6, 1), -1), ok[:, :1]], 1)},
        "integer": {"0.weight": ok.float()},
    }
    for expected, selection in cases.items():
        with pytest.raises(SelectionError, match=expected) as err:
            apply_sparse(model, selection)
        assert next(iter(selection)) in str(err.value)
    assert type(model[0]) is nn.Linear  # nothing was converted by a failed call
    apply_sparse(model, {"0.weight": ok})
    with pytest.raises(SelectionError, match="already sparse"):
        apply_sparse(model, {"0.weight": ok})


def test_multihead_attention_out_proj_is_refused():
    mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(SelectionError, match="out_proj"):
        apply_sparse(mha, {"out_proj.weight": random_indices(8, 8, 1)})
