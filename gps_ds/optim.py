"""Optimizer, learning-rate schedule and training loss for the trainer (timm where it has them)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def scaled_lr(train_cfg, global_batch: int | None) -> float:
    """The peak learning rate for ``global_batch`` samples per optimizer step under
    ``train.lr_scaling``: ``lr x (global_batch / lr_base_batch)`` (linear), its square root
    (sqrt), or ``lr`` itself (none). Warm-up start and minimum lr are absolute, never scaled."""
    rule = getattr(train_cfg, "lr_scaling", "none")
    if rule == "none":
        return train_cfg.lr
    if global_batch is None or global_batch < 1:
        raise ValueError(f"train.lr_scaling={rule} needs the global batch size, got {global_batch!r}")
    ratio = global_batch / train_cfg.lr_base_batch
    return train_cfg.lr * (ratio if rule == "linear" else math.sqrt(ratio))


def build_optimizer(model: nn.Module, train_cfg, global_batch: int | None = None) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD over the trainable parameters, at :func:`scaled_lr` for
    ``global_batch``. Weight decay applies to tensors of two or more dimensions (weights and GPS
    value tensors), not to biases, norms or layer scales."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            dims = len(getattr(p, "ds_shape", None) or p.shape)  # ZeRO-3 partitions keep the full shape there
            (decay if dims >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("nothing to train: no parameter requires a gradient")
    groups = [g for g in (
        {"params": decay, "weight_decay": train_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ) if g["params"]]
    lr = scaled_lr(train_cfg, global_batch)
    if train_cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=train_cfg.momentum)
    raise ValueError(f"unknown train.optimizer '{train_cfg.optimizer}'")


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg, steps_per_epoch: int):
    """Cosine decay to `min_lr` with a linear warm-up from `warmup_lr`, updated every step."""
    from timm.scheduler import CosineLRScheduler

    total = train_cfg.epochs * steps_per_epoch
    warmup = int(round(train_cfg.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(
        optimizer, t_initial=max(total - warmup, 1), lr_min=train_cfg.min_lr, warmup_t=warmup,
        warmup_lr_init=train_cfg.warmup_lr, warmup_prefix=True, t_in_epochs=False,
    )
