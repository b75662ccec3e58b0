"""Optimizer, learning-rate schedule and training loss for the trainer (timm where it has them)."""

from __future__ import annotations

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, train_cfg) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD over the trainable parameters. Weight decay applies to tensors of two or
    more dimensions (weights and GPS value tensors), not to biases, norms or layer scales."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("nothing to train: no parameter requires a gradient")
    groups = [g for g in (
        {"params": decay, "weight_decay": train_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ) if g["params"]]
    if train_cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=train_cfg.lr)
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train_cfg.lr)
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=train_cfg.momentum)
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
