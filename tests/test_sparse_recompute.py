"""A sparse Linear fed by a LayerNorm or GELU keeps no copy of its input for the selected-entry
gradient: backward recomputes it from what the LayerNorm / GELU node saves anyway. Gradients
are checked against a dense float64 reference; memory by what the autograd nodes hold."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gps_ds.sparse import apply_sparse, kernel_settings
from gps_ds.sparse.testing import random_indices


class Block(nn.Module):
    """norm -> fc1 -> GELU -> fc2, the MLP half of a ViT block."""

    def __init__(self, dim=12, hidden=40):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def _make(k=2, compact=0.5):
    torch.manual_seed(0)
    block = Block()
    with torch.no_grad():  # a non-trivial norm, so that its affine part is recomputed too
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.normal_()
    dense = Block().double()
    dense.load_state_dict(block.state_dict())
    sel = {}
    for name in ("fc1", "fc2"):
        lin = getattr(block, name)
        sel[name] = random_indices(lin.out_features, lin.in_features, k, generator=torch.Generator().manual_seed(1))
        apply_sparse(lin, {"weight": sel[name]})
        for p in (block.norm.weight, block.norm.bias):
            p.requires_grad_(False)
    for p in dense.norm.parameters():
        p.requires_grad_(False)
    return block, dense, sel


def _grads(block, x):
    x = x.clone().requires_grad_(True)
    block(x).square().sum().backward()
    return x.grad, {n: getattr(block, n).gps_values.grad.clone() for n in ("fc1", "fc2")}


def _dense_grads(dense, sel, x):
    x = x.double().clone().requires_grad_(True)
    dense(x).square().sum().backward()
    return x.grad, {n: getattr(dense, n).weight.grad.gather(1, sel[n]) for n in ("fc1", "fc2")}


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("compact", [0.0, 1.0])
def test_gradients_match_dense_reference(recompute, compact):
    block, dense, sel = _make()
    x = torch.randn(3, 5, 12)
    with kernel_settings(recompute_inputs=recompute, compact_ratio=compact):
        gx, gv = _grads(block, x)
    rx, rv = _dense_grads(dense, sel, x)
    torch.testing.assert_close(gx, rx.float(), rtol=1e-4, atol=1e-5)
    for n in gv:
        torch.testing.assert_close(gv[n], rv[n].float(), rtol=1e-4, atol=1e-5)


def _own_activations(block, x):
    """Bytes of activation-sized tensors that the sparse Linear nodes hold and no other node does."""
    x = x.clone().requires_grad_(True)
    y = block(x)
    others, mine, seen = set(), [], set()
    stack = [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack += [nxt for nxt, _ in node.next_functions]
        if type(node).__name__ == "SparseLinearFunctionBackward":
            mine += [t for t in node.saved_tensors if t is not None]
        else:
            for attr in dir(node):
                if attr.startswith("_saved_"):
                    v = getattr(node, attr)
                    if isinstance(v, torch.Tensor):
                        others.add(v.data_ptr())
    params = {p.data_ptr() for p in block.parameters()} | {b.data_ptr() for b in block.buffers()}
    return sum(t.numel() * t.element_size() for t in mine if t.data_ptr() not in others | params and t.dim() > 1)


def test_no_second_copy_of_the_inputs():
    block, _, _ = _make(compact=0.0)
    x = torch.randn(4, 7, 12)
    with kernel_settings(compact_ratio=0.0):
        assert _own_activations(block, x) == 0
        with kernel_settings(recompute_inputs=False):  # the old way: fc1's and fc2's inputs kept
            assert _own_activations(block, x) == 4 * 7 * (12 + 40) * 4


def test_under_activation_checkpointing_the_inputs_are_saved_as_usual():
    block, dense, sel = _make()
    x = torch.randn(2, 3, 12, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).square().sum().backward()
    rx, rv = _dense_grads(dense, sel, x.detach())
    torch.testing.assert_close(x.grad, rx.float(), rtol=1e-4, atol=1e-5)
    for n in ("fc1", "fc2"):
        torch.testing.assert_close(getattr(block, n).gps_values.grad, rv[n].float(), rtol=1e-4, atol=1e-5)


def test_a_zero3_partitioned_base_keeps_its_input():
    """Under ZeRO-3 the base weight carries a `ds_id` and the producer's norm parameters may be freed
    before this backward: the input is kept (the old way) and the gradients still match the reference."""
    block, dense, sel = _make(compact=0.0)
    for name in ("fc1", "fc2"):
        getattr(block, name).weight.ds_id = 7  # what deepspeed.zero.Init sets on every parameter
    x = torch.randn(4, 7, 12)
    with kernel_settings(compact_ratio=0.0):
        assert _own_activations(block, x) == 4 * 7 * (12 + 40) * 4
        gx, gv = _grads(block, x)
    rx, rv = _dense_grads(dense, sel, x)
    torch.testing.assert_close(gx, rx.float(), rtol=1e-4, atol=1e-5)
    for n in gv:
        torch.testing.assert_close(gv[n], rv[n].float(), rtol=1e-4, atol=1e-5)
