"""Losses for the scoring pass: supervised contrastive (default) and cross-entropy.

Supervised contrastive loss after Khosla et al., NeurIPS 2020 ("L_out" form), with
L2-normalised features and temperature 0.07 as in the GPS paper.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """`features` (N, V, D): V views of N samples; `labels` (N,). Returns the mean loss over anchors.

    Each of the N*V anchors is pulled towards every other view with the same label and pushed
    from all other views; anchors without a positive (impossible for V >= 2) are skipped.
    """
    if features.dim() != 3:
        raise ValueError(f"supcon_loss expects features of shape (N, views, D), got {tuple(features.shape)}")
    n, views, _ = features.shape
    z = F.normalize(features.float(), dim=-1).transpose(0, 1).reshape(n * views, -1)
    y = labels.repeat(views)
    logits = z @ z.T / temperature
    self_mask = torch.eye(n * views, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (y[:, None] == y[None, :]) & ~self_mask
    pos_count = positives.sum(1)
    pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)
    has_pos = pos_count > 0
    return -(pos_log_prob[has_pos] / pos_count[has_pos]).mean()


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The feature the head would see: CLS/pooled token after the final norm (timm pre-logits)."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(images), pre_logits=True)
    raise TypeError(f"{type(model).__name__} has no forward_features/forward_head; use gps.loss='ce' or 'task'")


def gather_global_batch(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's features and labels in rank order; only this rank's slice carries gradient.

    Each rank then computes the same global loss, and the gradient reaching its own samples is
    exactly the single-process gradient of that loss through them, so the gradients summed over
    ranks equal a single process's on the global batch. Micro-batches must be equal in size.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, labels
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.int64, device=labels.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([labels.shape[0]], dtype=torch.int64, device=labels.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"SupCon across ranks needs equal micro-batches, got sizes {[int(s) for s in sizes]}")
    feats = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(feats, features.detach().contiguous())
    feats[rank] = features
    labs = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(labs, labels.contiguous())
    return torch.cat(feats), torch.cat(labs)


ScoreLoss = Callable[[nn.Module, object, torch.Tensor], torch.Tensor]


def make_score_loss(name: str, temperature: float = 0.07, task_loss: ScoreLoss | None = None,
                    across_ranks: bool = False) -> ScoreLoss:
    """`loss(model, inputs, labels)`; for supcon `inputs` is a pair of views, else one batch.

    `across_ranks`: SupCon contrasts each anchor with the whole global batch (all ranks'
    features), as one process holding that batch would; cross-entropy needs nothing extra."""
    if name == "supcon":
        def loss(model: nn.Module, inputs, labels: torch.Tensor) -> torch.Tensor:
            if not isinstance(inputs, (tuple, list)) or len(inputs) < 2:
                raise ValueError("gps.loss='supcon' needs two augmented views per image")
            both = torch.cat(list(inputs), dim=0)
            feats = pooled_features(model, both)
            feats = feats.reshape(len(inputs), labels.shape[0], -1).transpose(0, 1)
            if across_ranks:
                feats, labels = gather_global_batch(feats, labels)
            return supcon_loss(feats, labels, temperature)
        return loss
    if name == "ce":
        def loss(model: nn.Module, inputs, labels: torch.Tensor) -> torch.Tensor:
            if isinstance(inputs, (tuple, list)):
                inputs = inputs[0]
            return F.cross_entropy(model(inputs), labels)
        return loss
    if name == "task":
        if task_loss is None:
            raise ValueError("gps.loss='task' needs the task's training loss (segmentation models)")
        return task_loss
    raise ValueError(f"unknown gps.loss '{name}' (expected one of: supcon, ce, task)")
