"""Autograd functions for Linear / Conv2d whose only trainable weight entries are K per row.

Backward computes the input gradient, the bias gradient and the gradient of the K selected
entries per row, never a dense weight gradient (except transiently on the "dense" paths).
Following DeepSpeed's LinearFunctionForZeroStage3, the functions save the Parameter
objects themselves (ZeRO-3 re-gathers and frees them around backward), never a dense
tensor derived from them: the effective weight exists only while one matmul / conv runs
(see ``written_weight``). Kernel paths are chosen per call by ``settings``.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import settings as S
from .conv_kernels import (
    ConvGeometry,
    conv_backward,
    conv_grad_dense,
    conv_grad_gather,
    conv_grad_unfold,
)
from .indices import IndexPlan
from .linear_kernels import (
    acc_dtype,
    csr_layout,
    fused_grads,
    fused_index,
    sampled_product,
    sparse_term,
    sparse_term_input_grad,
    written_weight,
)


@contextmanager
def gathered(*params: Tensor | None) -> Iterator[None]:
    """Make ZeRO-3 partitioned parameters available for the duration of the block."""
    todo = [
        p for p in params
        if p is not None and getattr(getattr(p, "ds_status", None), "name", None) == "NOT_AVAILABLE"
    ]
    for p in todo:
        p.all_gather()
    try:
        yield
    finally:
        for p in todo:
            p.partition()


def _conv_grad_triton(*args):
    from .triton_kernels import conv_grad_triton  # imports triton only when the path is taken

    return conv_grad_triton(*args)


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul in for ``x``, or None outside autocast."""
    if not x.is_floating_point():
        return None
    dev = x.device.type
    try:
        if not torch.is_autocast_enabled(dev):
            return None
        return torch.get_autocast_dtype(dev)
    except TypeError:  # torch < 2.4
        if dev == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if dev == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def _no_autocast(x: Tensor, active: bool):
    return torch.autocast(device_type=x.device.type, enabled=False) if active else nullcontext()


def _saved_tensor_hooks_active() -> bool:
    """Inside activation checkpointing (or any saved-tensor hooks) a node's saved tensors are
    placeholders that must not be unpacked in the forward pass."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _input_recipe(x: Tensor) -> tuple | None:
    """When ``x`` is the output of a LayerNorm or GELU autograd node, the tensors that node keeps
    for its own backward anyway (LayerNorm: input, mean, rstd, weight, bias; GELU: input), from
    which backward recomputes ``x`` (an elementwise pass) instead of this function keeping a
    second activation: in a ViT block the qkv and fc1 inputs are LayerNorm outputs and fc2's is
    a GELU output, so saving them measured +550 MB over the frozen-weights bound for SAM ViT-B
    at 1024 px (a dense weight gradient needs them too; a frozen weight does not). None where
    that does not apply (other producers, saved-tensor hooks active, partitioned ZeRO-3 base
    weights whose norm parameters are freed between forward and backward)."""
    fn = x.grad_fn
    if fn is None or _saved_tensor_hooks_active():
        return None
    kind = type(fn).__name__
    try:
        if kind == "NativeLayerNormBackward0":
            if len(fn._saved_normalized_shape) != 1:
                return None
            inp, mean, rstd = fn._saved_input, fn._saved_result1, fn._saved_result2
            weight, bias = fn._saved_weight, fn._saved_bias
            if inp.shape != x.shape or mean is None or rstd is None:
                return None
            if any(getattr(t, "ds_id", None) is not None for t in (weight, bias) if t is not None):
                return None
            return ("layer_norm", inp, mean, rstd, weight, bias)
        if kind == "GeluBackward0":
            inp = fn._saved_self
            return ("gelu", fn._saved_approximate, inp) if inp.shape == x.shape else None
    except (AttributeError, RuntimeError):
        return None
    return None


def _recompute_input(recipe: tuple, tensors: tuple[Tensor | None, ...]) -> Tensor:
    if recipe[0] == "layer_norm":
        inp, mean, rstd, weight, bias = tensors
        y = (inp - mean) * rstd
        if weight is not None:
            y = y * weight
        return y + bias if bias is not None else y
    (inp,) = tensors
    return F.gelu(inp, approximate=recipe[1])


def _check_frozen(weight: Tensor) -> None:
    if weight.requires_grad:
        raise RuntimeError(
            "the base weight of a sparse module must stay frozen (requires_grad=False); "
            "its trainable entries are gps_values"
        )


class SparseLinearFunction(torch.autograd.Function):
    """y = x @ (base + scatter(values))^T + bias for x of shape (..., in_features)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, values: Tensor, bias: Tensor | None, plan: IndexPlan) -> Tensor:
        _check_frozen(weight)
        cast = _autocast_dtype(x)
        dtype = cast or x.dtype
        rows, in_features = weight.shape
        with _no_autocast(x, cast is not None), gathered(weight, values, bias):
            xc = x.to(dtype)
            b = None if bias is None else bias.to(dtype)
            positions = xc.numel() // in_features
            if S.choose_weight_path(S.SETTINGS.forward, positions, rows, plan.k, in_features) == "merge":
                with written_weight(weight, values, plan, dtype) as w:
                    y = F.linear(xc, w, b)
            else:
                y = F.linear(xc, weight.to(dtype), b)
                term = sparse_term(xc.reshape(-1, in_features), values, plan.idx, plan.valid)
                y = y + term.view(y.shape)
        x_saved, recipe, recipe_tensors = None, None, ()
        if ctx.needs_input_grad[2]:
            # ZeRO-3 (the base weight is partitioned): the producer's norm parameters may be freed by
            # the time this backward runs, so the input is kept instead of recomputed.
            zero3 = getattr(weight, "ds_id", None) is not None
            recipe = _input_recipe(x) if S.SETTINGS.recompute_inputs and not zero3 else None
            if recipe is not None:
                recipe_tensors = tuple(t for t in recipe[1:] if t is None or isinstance(t, Tensor))
            else:
                # 2-D index_select: on a 3-D tensor the same column gather measured 10x slower
                x_saved = xc if plan.cols is None else xc.reshape(-1, in_features).index_select(1, plan.cols)
        ctx.save_for_backward(x_saved, weight, values, bias, *recipe_tensors)
        ctx.recipe = None if recipe is None else tuple(r for r in recipe if not isinstance(r, Tensor) and r is not None)
        ctx.plan = plan
        ctx.dtype = dtype
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x_saved, weight, values, bias, *recipe_tensors = ctx.saved_tensors
        plan: IndexPlan = ctx.plan
        dtype = ctx.dtype
        rows, in_features = weight.shape
        if ctx.recipe is not None:
            x_full = _recompute_input(ctx.recipe, tuple(recipe_tensors)).to(dtype).reshape(-1, in_features)
            x_saved = x_full if plan.cols is None else x_full.index_select(1, plan.cols)
            del x_full
        g2 = grad_out.reshape(-1, rows).to(dtype)
        positions = g2.shape[0]
        grad_x = grad_values = grad_bias = None
        with _no_autocast(grad_out, True), gathered(weight, values, bias):
            if ctx.needs_input_grad[0]:
                path = S.choose_weight_path(S.SETTINGS.input_grad, positions, rows, plan.k, in_features)
                if path == "merge":
                    with written_weight(weight, values, plan, dtype) as w:
                        gx2 = g2.matmul(w)
                else:
                    gx2 = sparse_term_input_grad(g2, values, plan.idx, plan.valid, g2.matmul(weight.to(dtype)))
                grad_x = gx2.view(*grad_out.shape[:-1], in_features).to(ctx.x_dtype)
            want_bias = bias is not None and ctx.needs_input_grad[3]
            if ctx.needs_input_grad[2]:
                x2 = x_saved.reshape(-1, x_saved.shape[-1])
                path = S.choose_linear_grad(positions, rows, plan.k, x2.shape[1], dtype, x2.device)
                table = None
                if path == "sddmm":
                    table = plan.cached("csr", lambda: csr_layout(plan.local, plan.valid))
                elif path == "fused":
                    table = plan.cached("fused", lambda: fused_index(plan.local, x2.shape[1]))
                elif path == "triton":  # int32 columns, converted once per selection
                    table = plan.cached("int32", lambda: plan.local.to(torch.int32))
                if path == "fused" and want_bias:  # the bias gradient in the same pass over g2
                    gv, gb = fused_grads(g2, x2, plan.local, plan.valid, table)
                    grad_values, grad_bias = gv.to(values.dtype), gb.to(bias.dtype)
                else:
                    chunk = S.chunk_elems(x2.device, x2.element_size())
                    grad_values = sampled_product(path, g2, x2, plan.local, plan.valid, chunk, table)
                    grad_values = grad_values.to(values.dtype)
            if want_bias and grad_bias is None:
                grad_bias = g2.sum(0, dtype=acc_dtype(dtype)).to(bias.dtype)
        return grad_x, None, grad_values, grad_bias, None


class SparseConv2dFunction(torch.autograd.Function):
    """conv2d(x, base + scatter(values), bias) for batched x of shape (N, C, H, W)."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, values: Tensor, bias: Tensor | None, plan: IndexPlan, geo: ConvGeometry
    ) -> Tensor:
        _check_frozen(weight)
        cast = _autocast_dtype(x)
        dtype = cast or x.dtype
        with _no_autocast(x, cast is not None), gathered(weight, values, bias):
            xc = x.to(dtype)
            b = None if bias is None else bias.to(dtype)
            with written_weight(weight, values, plan, dtype) as w:
                y = F.conv2d(xc, w, b, geo.stride, geo.padding, geo.dilation, geo.groups)
        needs_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        ctx.save_for_backward(xc if needs_x else None, weight, values, bias)
        ctx.plan = plan
        ctx.geo = geo
        ctx.dtype = dtype
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight, values, bias = ctx.saved_tensors
        plan: IndexPlan = ctx.plan
        geo: ConvGeometry = ctx.geo
        dtype = ctx.dtype
        g = grad_out.to(dtype)
        need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_x = grad_values = grad_bias = None
        with _no_autocast(grad_out, True), gathered(weight, values, bias):
            path = None
            if need_v:
                n, c = x.shape[:2]
                path = S.choose_conv_grad(
                    n, c, weight.shape[0], plan.k, g.shape[2] * g.shape[3], geo.kk, geo.groups, dtype, g.device
                )
            if path == "dense" or need_x:
                with written_weight(weight, values, plan, dtype) as w:
                    grad_x, gw = conv_backward(g, x, w, geo, need_x, path == "dense")
                if gw is not None:
                    grad_values = conv_grad_dense(gw, plan)
                    del gw
            if path != "dense" and path is not None:
                chunk = S.chunk_elems(g.device, g.element_size())
                kernel = {"unfold": conv_grad_unfold, "triton": _conv_grad_triton}.get(path, conv_grad_gather)
                grad_values = kernel(g, x, plan, geo, chunk)
            if grad_x is not None:
                grad_x = grad_x.to(ctx.x_dtype)
            if grad_values is not None:
                grad_values = grad_values.to(values.dtype)
            if bias is not None and ctx.needs_input_grad[3]:
                grad_bias = g.sum((0, 2, 3), dtype=acc_dtype(dtype)).to(bias.dtype)
        return grad_x, None, grad_values, grad_bias, None, None


def _needs_graph(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def sparse_linear(x: Tensor, weight: Tensor, values: Tensor, bias: Tensor | None, plan: IndexPlan) -> Tensor:
    """Linear with the sparse effective weight; outside autograd it skips the Function
    (nothing is saved for backward)."""
    if _needs_graph(x, values, bias):
        return SparseLinearFunction.apply(x, weight, values, bias, plan)
    with gathered(weight, values, bias), written_weight(weight, values, plan, weight.dtype) as w:
        return F.linear(x, w, bias)


def sparse_conv2d(
    x: Tensor, weight: Tensor, values: Tensor, bias: Tensor | None, plan: IndexPlan, geo: ConvGeometry
) -> Tensor:
    """conv2d with the sparse effective weight; outside autograd it skips the Function."""
    if _needs_graph(x, values, bias):
        return SparseConv2dFunction.apply(x, weight, values, bias, plan, geo)
    with gathered(weight, values, bias), written_weight(weight, values, plan, weight.dtype) as w:
        return F.conv2d(x, w, bias, geo.stride, geo.padding, geo.dilation, geo.groups)
