"""Masked mode: dense weights whose non-selected entries never move.

Zeroing gradients is not enough: weight decay (coupled or decoupled) and momentum would
still move frozen entries. ``MaskedGradients`` therefore (1) zeroes non-selected
gradients after backward and again right before every optimizer step, and (2) takes
weight decay over for the masked parameters: their param group runs with
weight_decay=0 and the decay is applied here to the selected entries only. With zero
gradients from the first step, momentum / Adam moments of frozen entries stay exactly
0, so their update is exactly 0 and they stay bit-identical.

The low-level helpers act on a given (param, grad, indices) so a DeepSpeed engine hook
that steps fp32 master copies can reuse them.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
from torch import Tensor

from .indices import SelectionError, check_indices


def _rows_view(t: Tensor) -> Tensor:
    return t.view(t.shape[0], -1)


def _clamped(indices: Tensor, valid: Tensor | None) -> Tensor:
    return indices if valid is None else indices.clamp(min=0)


def selection_mask(shape: torch.Size | tuple[int, ...], indices: Tensor, valid: Tensor | None = None) -> Tensor:
    """Dense bool mask (``shape``) that is True at the selected entries."""
    mask = torch.zeros(shape[0], int(torch.Size(shape[1:]).numel()), dtype=torch.bool, device=indices.device)
    idx = _clamped(indices, valid)
    if valid is None:
        mask.scatter_(1, idx, True)
    else:
        rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx)
        mask[rows[valid], idx[valid]] = True
    return mask.view(shape)


def mask_grad_(grad: Tensor, indices: Tensor, valid: Tensor | None = None) -> Tensor:
    """Zero, in place, every entry of ``grad`` (weight-shaped) outside the selection.

    Selected entries keep their exact values (also inf/nan elsewhere is cleared).
    """
    if not grad.is_contiguous():
        tmp = grad.contiguous()
        mask_grad_(tmp, indices, valid)
        grad.copy_(tmp)
        return grad
    flat = _rows_view(grad)
    idx = _clamped(indices, valid)
    kept = flat.gather(1, idx)
    if valid is not None:
        kept.masked_fill_(~valid, 0)
    flat.zero_()
    # 0 + v == v exactly; padded slots add an exact 0 to their clamped column.
    flat.scatter_add_(1, idx, kept)
    return grad


def add_coupled_decay_(grad: Tensor, param: Tensor, indices: Tensor, valid: Tensor | None, weight_decay: float) -> Tensor:
    """L2 decay as Adam / SGD apply it (grad += wd * param), at the selected entries only."""
    if not weight_decay:
        return grad
    gflat, pflat = _rows_view(grad), _rows_view(param.detach())
    idx = _clamped(indices, valid)
    g = gflat.gather(1, idx).add_(pflat.gather(1, idx), alpha=weight_decay)
    if valid is None:
        gflat.scatter_(1, idx, g)
    else:
        rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx)
        gflat[rows[valid], idx[valid]] = g[valid]
    return grad


def apply_decoupled_decay_(param: Tensor, indices: Tensor, valid: Tensor | None, lr: float, weight_decay: float) -> Tensor:
    """Decoupled decay as torch.optim.AdamW applies it before its update
    (param *= 1 - lr * wd), at the selected entries only."""
    if not weight_decay:
        return param
    lr = float(lr)
    with torch.no_grad():
        pflat = _rows_view(param.data)
        idx = _clamped(indices, valid)
        p = pflat.gather(1, idx).mul_(1 - lr * weight_decay)
        if valid is None:
            pflat.scatter_(1, idx, p)
        else:
            rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx)
            pflat[rows[valid], idx[valid]] = p[valid]
    return param


_DECOUPLED_GROUP_KEYS = ("decoupled_weight_decay", "decoupled", "decoupled_decay")
_DECOUPLED_ATTRS = ("adam_w_mode", "adamw_mode")  # DeepSpeed FusedAdam / DeepSpeedCPUAdam
_DECOUPLED_NAMES = ("AdamW", "Lion")


def is_decoupled(optimizer: torch.optim.Optimizer, group: Mapping | None = None) -> bool:
    """Whether ``optimizer`` applies weight decay decoupled (AdamW-style) or coupled (L2 in the grad)."""
    group = group if group is not None else (optimizer.param_groups[0] if optimizer.param_groups else {})
    if group.get("corrected_weight_decay"):
        raise ValueError(
            f"{type(optimizer).__name__} with corrected_weight_decay=True is not supported by masked mode; "
            "pass decoupled=... only for plain (lr * wd) decay"
        )
    for key in _DECOUPLED_GROUP_KEYS:
        if key in group:
            return bool(group[key])
    for attr in _DECOUPLED_ATTRS:
        if hasattr(optimizer, attr):
            return bool(getattr(optimizer, attr))
    if isinstance(optimizer, torch.optim.AdamW):
        return True
    name = type(optimizer).__name__
    return any(n in name for n in _DECOUPLED_NAMES)


class _Entry:
    __slots__ = ("name", "param", "indices", "valid")

    def __init__(self, name: str, param: nn.Parameter, indices: Tensor, valid: Tensor | None) -> None:
        self.name, self.param, self.indices, self.valid = name, param, indices, valid


class MaskedGradients:
    """Train only the selected entries of dense weights.

    ``selection``: {parameter name: (rows, K) indices into the row flattened to fan_in}.
    ``decoupled``: force decoupled (True) or coupled (False) weight decay; None detects it
    from the optimizer. Call ``attach(optimizer)`` before the first step.
    """

    def __init__(
        self, model: nn.Module, selection: Mapping[str, Tensor], *, decoupled: bool | None = None
    ) -> None:
        params = dict(model.named_parameters())
        self.decoupled = decoupled
        self._entries: dict[str, _Entry] = {}
        for name, indices in selection.items():
            if name not in params:
                raise SelectionError(f"{name}: not a parameter of the model")
            p = params[name]
            if p.dim() < 2:
                raise SelectionError(f"{name}: masked mode needs a weight of 2 or more dimensions, got {tuple(p.shape)}")
            idx, valid = check_indices(name, indices, p.shape[0], p[0].numel())
            idx = idx.to(p.device)
            valid = None if valid is None else valid.to(p.device)
            self._entries[name] = _Entry(name, p, _clamped(idx, valid), valid)
        self._by_param = {e.param: e for e in self._entries.values()}
        self._handles: list = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._decoupled_resolved: bool | None = None

    # --- helpers usable by other training loops (DeepSpeed engine hooks, fp32 masters) ---
    def names(self) -> list[str]:
        return list(self._entries)

    def indices(self, name: str) -> tuple[Tensor, Tensor | None]:
        """(indices with padding clamped to 0, valid mask or None) for ``name``."""
        e = self._entries[name]
        return e.indices, e.valid

    def mask(self, name: str) -> Tensor:
        """Dense bool mask of ``name`` (e.g. to slice per ZeRO shard)."""
        e = self._entries[name]
        return selection_mask(e.param.shape, e.indices, e.valid)

    def mask_grad_(self, name: str, grad: Tensor) -> Tensor:
        """Zero, in place, the non-selected entries of ``grad`` (shaped like parameter ``name``)."""
        e = self._entries[name]
        return mask_grad_(grad, e.indices.to(grad.device), None if e.valid is None else e.valid.to(grad.device))

    def decay_(self, name: str, param: Tensor, grad: Tensor, lr: float, weight_decay: float) -> None:
        """Apply weight decay to the selected entries of ``param`` (or its fp32 master copy):
        decoupled (param *= 1 - lr*wd) or coupled (grad += wd*param), as configured or
        detected at ``attach``."""
        decoupled = self._decoupled_resolved if self._decoupled_resolved is not None else self.decoupled
        if decoupled is None:
            raise RuntimeError("pass decoupled=True/False to MaskedGradients or call attach(optimizer) first")
        e = self._entries[name]
        idx = e.indices.to(param.device)
        valid = None if e.valid is None else e.valid.to(param.device)
        if decoupled:
            apply_decoupled_decay_(param, idx, valid, lr, weight_decay)
        else:
            add_coupled_decay_(grad, param, idx, valid, weight_decay)

    # --- optimizer integration ---
    def attach(self, optimizer: torch.optim.Optimizer, *, mask_on_backward: bool = True) -> "MaskedGradients":
        """Hook ``optimizer``: mask grads before each step and apply decay to selected entries only.

        Masked parameters that share a param group with other parameters are moved into a
        group of their own (same hyper-parameters) so their group can run with
        weight_decay=0; the original decay is kept in the group's ``gps_weight_decay``.
        Attach before building an LR scheduler (schedulers record one base lr per group)
        and before wrapping the optimizer (e.g. deepspeed.initialize).
        """
        if self._optimizer is not None:
            raise RuntimeError("MaskedGradients is already attached; call detach() first")
        self._decoupled_resolved = self.decoupled
        if self._decoupled_resolved is None:
            self._decoupled_resolved = is_decoupled(optimizer)
        for group in list(optimizer.param_groups):
            masked = [p for p in group["params"] if p in self._by_param]
            if not masked or "gps_weight_decay" in group:
                continue
            wd = group.get("weight_decay", 0.0) or 0.0
            if len(masked) == len(group["params"]):
                group["gps_weight_decay"] = wd
                if "weight_decay" in group:
                    group["weight_decay"] = 0.0
            else:
                group["params"] = [p for p in group["params"] if p not in self._by_param]
                new = {k: v for k, v in group.items() if k != "params"}
                new.update(params=masked, gps_weight_decay=wd)
                if "weight_decay" in new:
                    new["weight_decay"] = 0.0
                optimizer.add_param_group(new)
        self._clear_frozen_state(optimizer)
        self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
        if mask_on_backward:
            for e in self._entries.values():
                if e.param.requires_grad:
                    self._handles.append(e.param.register_post_accumulate_grad_hook(self._mask_param_grad))
        self._optimizer = optimizer
        return self

    def detach(self) -> None:
        """Remove the hooks and give the param groups their weight decay back (groups stay split)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._optimizer is not None:
            for group in self._optimizer.param_groups:
                if "gps_weight_decay" in group:
                    wd = group.pop("gps_weight_decay")
                    if "weight_decay" in group:
                        group["weight_decay"] = wd
        self._optimizer = None

    def _mask_param_grad(self, param: Tensor) -> None:
        e = self._by_param[param]
        if param.grad is not None:
            mask_grad_(param.grad, e.indices, e.valid)

    def _clear_frozen_state(self, optimizer: torch.optim.Optimizer) -> None:
        # If attached mid-training, momentum / moments of frozen entries would keep moving them.
        for p, e in self._by_param.items():
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape and value.is_floating_point():
                    with torch.no_grad():
                        mask_grad_(value, e.indices, e.valid)

    def _pre_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            wd = group.get("gps_weight_decay", 0.0)
            for p in group["params"]:
                e = self._by_param.get(p)
                if e is None or p.grad is None:
                    continue
                mask_grad_(p.grad, e.indices, e.valid)
                if not wd:
                    continue
                lr = group["lr"]
                self.decay_(e.name, p, p.grad, lr.item() if isinstance(lr, Tensor) else lr, wd)
