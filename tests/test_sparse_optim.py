"""Sparse mode vs masked mode vs a hand-written dense reference through optimizer steps."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gps_ds.sparse import (
    MaskedGradients,
    apply_sparse,
    is_decoupled,
    mask_grad_,
    merge_sparse,
    merged_weight,
    selection_mask,
    sparse_modules,
)
from gps_ds.sparse.testing import random_indices

STEPS = 5


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(x)))


def build():
    torch.manual_seed(0)
    return Small()


def selection():
    gen = torch.Generator().manual_seed(3)
    return {
        "conv.weight": random_indices(4, 27, 5, generator=gen),
        "fc1.weight": random_indices(16, 64, 3, generator=gen, pad=True),
        "fc2.weight": random_indices(5, 16, 2, generator=gen).to(torch.int32),
    }


def batches():
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(STEPS)]


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05),
}
BIT_EXACT_OPTIMIZERS = {
    **OPTIMIZERS,
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05, foreach=True),
    "sgd_nesterov": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
}


def reference_training(kind, sel):
    """Dense model, dense grads, hand-written optimizer math with masks (no torch.optim)."""
    model = build()
    params = dict(model.named_parameters())
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    for n, idx in sel.items():
        masks[n] = selection_mask(params[n].shape, idx.long().clamp(min=0), idx >= 0)
    state = {n: {} for n in params}
    for t, (x, y) in enumerate(batches(), start=1):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for n, p in params.items():
                m = masks[n]
                g = torch.where(m, p.grad, 0.0)
                s = state[n]
                if kind == "sgd":
                    d = g + 0.01 * p * m
                    s["buf"] = d.clone() if t == 1 else 0.9 * s["buf"] + d
                    p -= 0.1 * s["buf"]
                else:
                    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
                    if kind == "adam":
                        g = g + 0.01 * p * m
                    else:
                        p.copy_(torch.where(m, p * (1 - lr * 0.05), p))
                    s["m"] = b1 * s.get("m", torch.zeros_like(p)) + (1 - b1) * g
                    s["v"] = b2 * s.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
                    mhat, vhat = s["m"] / (1 - b1**t), s["v"] / (1 - b2**t)
                    p -= lr * mhat / (vhat.sqrt() + eps)
    return model


def sparse_training(kind, sel):
    model = apply_sparse(build(), sel)
    opt = OPTIMIZERS[kind]([p for p in model.parameters() if p.requires_grad])
    for x, y in batches():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def masked_training(kind, sel, autocast=False):
    model = build()
    opt = BIT_EXACT_OPTIMIZERS[kind](model.parameters())
    mg = MaskedGradients(model, sel).attach(opt)
    for x, y in batches():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return model, opt, mg


def effective(model, name):
    module = model.get_submodule(name)
    return merged_weight(module)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_sparse_masked_and_reference_agree(kind):
    sel = selection()
    sparse, _ = sparse_training(kind, sel)
    masked, _, _ = masked_training(kind, sel)
    ref = reference_training(kind, sel)
    for name in ("conv", "fc1", "fc2"):
        w_sparse, w_masked, w_ref = effective(sparse, name), effective(masked, name), effective(ref, name)
        torch.testing.assert_close(w_sparse, w_masked, rtol=0, atol=1e-6)
        torch.testing.assert_close(w_masked, w_ref, rtol=0, atol=1e-6)
        for model in (sparse, masked):
            torch.testing.assert_close(model.get_submodule(name).bias, ref.get_submodule(name).bias, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(BIT_EXACT_OPTIMIZERS))
@pytest.mark.parametrize("autocast", [False, True])
def test_masked_frozen_entries_bit_identical(kind, autocast):
    sel = selection()
    before = {n: p.detach().clone() for n, p in build().named_parameters()}
    model, opt, mg = masked_training(kind, sel, autocast)
    params = dict(model.named_parameters())
    for name, idx in sel.items():
        mask = mg.mask(name)
        p = params[name].detach()
        assert torch.equal(p[~mask], before[name][~mask]), name
        assert (p[mask] != before[name][mask]).all(), name
        assert opt.param_groups[-1]["weight_decay"] == 0.0
    # biases still train (with their decay) in their original group
    assert not torch.equal(params["fc1.bias"], before["fc1.bias"])
    mg.detach()
    assert all(g["weight_decay"] != 0.0 for g in opt.param_groups)
    model.zero_grad()
    F.cross_entropy(model(batches()[0][0]), batches()[0][1]).backward()
    assert (params["fc2.weight"].grad[~mg.mask("fc2.weight")] != 0).any()  # hooks are gone


def test_masked_low_level_helpers_on_master_copies():
    """The helpers work on any (grad, indices) pair, e.g. fp32 masters of a bf16 model."""
    sel = selection()
    model = build().to(torch.bfloat16)
    mg = MaskedGradients(model, sel)
    F.cross_entropy(model(batches()[0][0].bfloat16()), batches()[0][1]).backward()
    for name, p in model.named_parameters():
        if name in sel:
            master_grad = p.grad.float()
            mg.mask_grad_(name, master_grad)
            mask = mg.mask(name)
            assert (master_grad[~mask] == 0).all()
            assert torch.equal(master_grad[mask], p.grad.float()[mask])
    g = torch.full((3, 4), float("nan"))
    idx = torch.tensor([[0, 2], [1, -1], [-1, -1]])
    mask_grad_(g, idx.clamp(min=0), idx >= 0)
    assert torch.isnan(g[0, [0, 2]]).all() and torch.isnan(g[1, 1]) and (g.nan_to_num(7).eq(7).sum() == 3)


def test_sparse_optimizer_state_only_for_trainable_tensors():
    sel = selection()
    model, opt = sparse_training("adamw", sel)
    state_ids = {id(p) for p in opt.state}
    for _, module in sparse_modules(model):
        assert id(module.weight) not in state_ids
        assert not module.weight.requires_grad and module.weight.grad is None
        st = opt.state[module.gps_values]
        rows, k = module.gps_indices.shape
        tensor_bytes = sum(v.numel() * v.element_size() for v in st.values() if v.dim() > 0)
        assert tensor_bytes == 2 * rows * k * 4  # exp_avg + exp_avg_sq, (rows, K) fp32
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state_elems = sum(v.numel() for s in opt.state.values() for v in s.values() if v.dim() > 0)
    assert state_elems == 2 * trainable


def test_merge_sparse_gives_equal_outputs():
    sel = selection()
    model, _ = sparse_training("adam", sel)
    x = batches()[0][0]
    with torch.no_grad():
        y_sparse = model(x)
    merged = merge_sparse(copy.deepcopy(model))
    assert [type(m) for m in (merged.conv, merged.fc1, merged.fc2)] == [nn.Conv2d, nn.Linear, nn.Linear]
    assert [n for n, _ in merged.named_parameters()] == [n for n, _ in build().named_parameters()]
    assert all(p.requires_grad for p in merged.parameters())
    assert not list(merged.buffers())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), y_sparse, rtol=0, atol=1e-6)
    again = apply_sparse(merged, sel)  # merge -> apply round trip
    with torch.no_grad():
        torch.testing.assert_close(again(x), y_sparse, rtol=0, atol=1e-6)


def test_masked_selection_errors_and_decay_helper():
    from gps_ds.sparse import SelectionError

    model = build()
    with pytest.raises(SelectionError, match="fc1.weight.*out of range"):
        MaskedGradients(model, {"fc1.weight": torch.full((16, 2), 64)})
    with pytest.raises(SelectionError, match="fc2.weight.*does not fit"):
        MaskedGradients(model, {"fc2.weight": torch.zeros(4, 1, dtype=torch.long)})
    sel = selection()
    mg = MaskedGradients(model, sel, decoupled=True)
    master = model.fc2.weight.detach().clone()
    mg.decay_("fc2.weight", master, None, lr=0.5, weight_decay=0.1)
    mask = mg.mask("fc2.weight")
    assert torch.equal(master[~mask], model.fc2.weight.detach()[~mask])
    torch.testing.assert_close(master[mask], model.fc2.weight.detach()[mask] * 0.95)


def test_decoupled_detection():
    p = [nn.Parameter(torch.zeros(2, 2))]
    assert is_decoupled(torch.optim.AdamW(p))
    assert not is_decoupled(torch.optim.Adam(p, weight_decay=0.1))
    assert not is_decoupled(torch.optim.SGD(p, lr=0.1))

    class FusedAdamLike(torch.optim.Optimizer):
        def __init__(self, params, adam_w_mode):
            super().__init__(params, dict(lr=1e-3, weight_decay=0.0))
            self.adam_w_mode = adam_w_mode

    assert is_decoupled(FusedAdamLike(p, True)) and not is_decoupled(FusedAdamLike(p, False))
    timm_optim = pytest.importorskip("timm.optim")
    assert is_decoupled(timm_optim.Lamb(p, decoupled_decay=True))
    assert not is_decoupled(timm_optim.Lamb(p))
    assert is_decoupled(timm_optim.AdamWLegacy(p))
