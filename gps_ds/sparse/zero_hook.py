"""Masked mode on a DeepSpeed engine: ZeRO stages 1-3, and stage 0 with bf16.

Under those set-ups the inner torch optimizer (``engine.optimizer.optimizer``) steps on this
rank's flat fp32 partition of each parameter group, whose ``.grad`` is already reduced when
the optimizer's step pre-hooks run.  :class:`ZeroMaskedHook` builds, once, a bool mask per
flat partition that is True at the entries of masked weights that are *not* selected
("frozen"), and registers a step pre-hook that

1. zeroes the frozen entries of the reduced gradient partition;
2. applies the weight decay of the groups that hold masked parameters (their torch group runs
   with ``weight_decay=0``, the decay being kept in ``gps_weight_decay`` by
   :meth:`MaskedGradients.attach`) to every entry but the frozen ones: decoupled
   (``p *= 1 - lr*wd``, AdamW) or coupled (``g += wd*p``, Adam / SGD).

Frozen entries therefore see a zero gradient from the first step, their Adam moments stay 0,
their update is exactly 0 and they stay bit-identical (also in the bf16 model copy: the fp32
master entry never changes, so its bf16 cast does not either).

Known difference from stage 0 fp32 (where MaskedGradients masks at backward): DeepSpeed's
gradient clipping (``gradient_clipping``, 1.0 by default in 0.19) measures the global norm
before this hook runs, so the norm includes the non-selected gradients; this scales the
selected updates differently but never moves a frozen entry.

DeepSpeed internals relied on (DeepSpeed 0.19):

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``): ``bit16_groups[i]`` (params of flat group i) and
  ``single_partition_of_fp32_groups[i]`` (this rank's fp32 partition);
  ``param._hp_mapping.hp_fragment_address`` (offset/numel in that partition) and
  ``lp_fragment_address`` (offset in the flattened parameter); ``_hp_mapping is None`` when
  this rank holds no part of the parameter.
* stage 0 + bf16: DeepSpeed 0.19 wraps the client optimizer in ``FP16_UnfusedOptimizer``
  (``fp16_groups[i]`` / ``fp32_groups[i]``: one fp32 master copy per parameter, same shape, the
  inner optimizer's group ``params``); with ``BF16_Optimizer`` (``bf16_groups[i]``,
  ``fp32_groups_flat_partition[i]``, same ``_hp_mapping`` as ZeRO-1/2).
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): ``fp16_groups[j]`` (params of sub-group j) and
  ``fp32_partitioned_groups_flat[j]``, which is the params' ``ds_tensor`` partitions
  (``partition_numel()`` each, padded) concatenated in order; this rank's partition of a param
  starts at ``rank_in(ds_process_group) * partition_numel()`` of the flattened param.  The
  stage-3 step puts ``[fp32_partitioned_groups_flat[j]]`` into the group's ``params`` before
  calling the inner step, so the hook finds partitions by identity.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from .masked import MaskedGradients, is_decoupled, selection_mask


class MaskedZeroError(RuntimeError):
    pass


def _prank(p) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group=p.ds_process_group)
    return 0


def _flat_groups(engine) -> tuple[list[tuple[list[nn.Parameter], Tensor]], str]:
    opt = engine.optimizer
    stage = int(engine.zero_optimization_stage())
    kind = type(opt).__name__
    if stage == 3:
        return list(zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat)), "zero3"
    if stage in (1, 2):
        return list(zip(opt.bit16_groups, opt.single_partition_of_fp32_groups)), "hp"
    if kind == "BF16_Optimizer":
        return list(zip(opt.bf16_groups, opt.fp32_groups_flat_partition)), "hp"
    if kind == "FP16_UnfusedOptimizer" and hasattr(opt, "fp32_groups"):
        # bf16 at stage 0 (DeepSpeed 0.19): one fp32 master copy per parameter, same shape.
        pairs = [([p16], p32) for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups) for p16, p32 in zip(g16, g32)]
        return pairs, "whole"
    raise MaskedZeroError(f"masked mode: no engine hook for ZeRO stage {stage} with {kind}")


class ZeroMaskedHook:
    """Per-shard mask + masked weight decay on the engine's inner optimizer (see module doc)."""

    def __init__(self, engine, masked: MaskedGradients, model: nn.Module) -> None:
        self.engine = engine
        inner = getattr(engine.optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            raise MaskedZeroError(f"masked mode: {type(engine.optimizer).__name__} has no inner torch optimizer")
        self.inner = inner
        names = {id(p): n for n, p in model.named_parameters()}
        selected = set(masked.names())
        groups, layout = _flat_groups(engine)
        # id(flat partition) -> (flat partition, frozen bool mask or None)
        self._frozen: dict[int, tuple[Tensor, Tensor | None]] = {}
        self.frozen_entries = 0
        self.selected_entries = 0
        for params, flat in groups:
            if flat is None or flat.numel() == 0:
                continue
            frozen = None
            offset = 0
            for p in params:
                n = names.get(id(p))
                if layout == "zero3":
                    pn = int(p.partition_numel())
                    start = _prank(p) * pn
                    numel = max(0, min(pn, int(p.ds_numel) - start))
                    flat_start, lp_start = offset, start
                    offset += pn
                elif layout == "whole":
                    flat_start, lp_start, numel = 0, 0, p.numel()
                else:
                    hm = getattr(p, "_hp_mapping", None)
                    if hm is None:
                        continue
                    flat_start, lp_start = int(hm.hp_fragment_address.start), int(hm.lp_fragment_address.start)
                    numel = int(hm.hp_fragment_address.numel)
                if n not in selected or numel == 0:
                    continue
                idx, valid = masked.indices(n)
                shape = getattr(p, "ds_shape", None) or p.shape  # ZeRO-3 params are empty outside gathers
                keep = selection_mask(shape, idx, valid).reshape(-1).narrow(0, lp_start, numel).to(flat.device)
                if frozen is None:
                    frozen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
                frozen.narrow(0, flat_start, numel).copy_(~keep)
                self.selected_entries += int(keep.sum())
            if frozen is not None:
                frozen = frozen.view(flat.shape)
                self.frozen_entries += int(frozen.sum())
            self._frozen[id(flat)] = (flat, frozen)
        self._handle = inner.register_step_pre_hook(self._pre_step)

    def remove(self) -> None:
        self._handle.remove()

    def _pre_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            wd = group.get("gps_weight_decay", 0.0) or 0.0
            for p in group["params"]:
                entry = self._frozen.get(id(p))
                if entry is None or entry[0] is not p:
                    continue
                frozen = entry[1]
                if frozen is not None and p.grad is not None:
                    p.grad.masked_fill_(frozen, 0)
                if not wd or p.grad is None:
                    continue
                lr = group["lr"]
                lr = float(lr.item() if isinstance(lr, Tensor) else lr)
                with torch.no_grad():
                    if is_decoupled(optimizer, group):
                        decayed = p.mul(1 - lr * wd)
                        p.copy_(decayed if frozen is None else torch.where(frozen, p, decayed))
                    else:
                        g = p.grad.add(p, alpha=wd)
                        p.grad.copy_(g if frozen is None else torch.where(frozen, p.grad, g))


def masked_needs_engine_hook(ds_config: Mapping) -> bool:
    """Whether masked mode runs through :class:`ZeroMaskedHook` (else plain MaskedGradients)."""
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0) or 0)
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    return stage > 0 or bf16


def check_masked_supported(ds_config: Mapping) -> None:
    """Refuse the set-ups masked mode has not been verified under."""
    zero = ds_config.get("zero_optimization", {}) or {}
    if ds_config.get("fp16", {}).get("enabled"):
        raise ValueError("gps.mode='masked' does not run with fp16 (loss scaling); use bf16 or fp32, or "
                         "gps.mode='sparse'")
    for key in ("offload_optimizer", "offload_param"):
        dev = (zero.get(key) or {}).get("device", "none")
        if dev not in (None, "none"):
            raise ValueError(f"gps.mode='masked' does not run with zero_optimization.{key}; use gps.mode='sparse'")
    if ds_config.get("optimizer"):
        raise ValueError("gps.mode='masked' needs the trainer's client optimizer; remove the config's "
                         "deepspeed.optimizer section")
