"""apply_sparse on timm models: every Linear / Conv2d weight with a K=2 random selection."""

import copy

import pytest
import torch
import torch.nn as nn

from gps_ds.sparse import MaskedGradients, apply_sparse, merge_sparse, sparse_modules, sparse_values
from gps_ds.sparse.testing import random_selection

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", ["test_vit", "test_convnext"])
def test_timm_forward_backward_matches_dense(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    sel = random_selection(model, k=2, seed=1, pad=(name == "test_convnext"))
    dense = copy.deepcopy(model)
    apply_sparse(model, sel)
    assert {f"{n}.weight" for n, _ in sparse_modules(model)} == set(sel)
    x = torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])
    out = model(x)
    out.square().mean().backward()
    dense_out = dense(x)
    dense_out.square().mean().backward()
    torch.testing.assert_close(out, dense_out, rtol=1e-4, atol=1e-5)
    dense_params = dict(dense.named_parameters())
    for mod_name, module in sparse_modules(model):
        key = f"{mod_name}.weight"
        idx = sel[key].long()
        g_ref = dense_params[key].grad.reshape(idx.shape[0], -1).gather(1, idx.clamp(min=0)) * (idx >= 0)
        torch.testing.assert_close(module.gps_values.grad, g_ref, rtol=1e-4, atol=1e-6, msg=key)
        assert module.weight.grad is None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".weight")]
    assert not any(n in sel for n in trainable)  # selected bases are frozen
    values = sparse_values(model)
    assert set(values) == set(sel)
    assert all(values[k][0].shape == sel[k].shape for k in sel)


def test_timm_masked_mode_and_merge_roundtrip():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=10)
    sel = random_selection(model, k=2, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    mg = MaskedGradients(model, sel).attach(opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    model(x).sum().backward()
    opt.step()
    for name, p in model.named_parameters():
        if name in sel:
            mask = mg.mask(name)
            assert torch.equal(p.detach()[~mask], before[name][~mask]), name
    sparse = apply_sparse(copy.deepcopy(model), sel)
    merged = merge_sparse(copy.deepcopy(sparse))
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged(x), model(x), rtol=0, atol=0)
    assert all(type(m) in (nn.Linear, nn.Conv2d) for m in merged.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
