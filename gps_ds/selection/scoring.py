"""The scoring pass: one pass over the training data, no optimizer, signed gradient sum.

The score of a weight is |Σ_b g_b| where g_b is the gradient of batch b's mean loss; the
absolute value is taken only once, at the end, for ranking. The model runs in eval mode so
that drop-path/dropout do not make the scores depend on random draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

from gps_ds.selection.losses import ScoreLoss


class ScoringError(ValueError):
    pass


@dataclass
class ScoreResult:
    scores: dict[str, torch.Tensor]
    batches: int
    samples: int


def _batch_size(labels: torch.Tensor) -> int:
    return int(labels.shape[0])


def accumulate_scores(
    model: nn.Module,
    batches: Iterable[tuple[object, torch.Tensor]],
    loss_fn: ScoreLoss,
    candidates: list[str],
    max_batches: int | None = None,
    progress=None,
) -> ScoreResult:
    """Run `loss_fn(model, inputs, labels).backward()` over `batches`; return |Σg| per candidate.

    Only candidate parameters require gradients during the pass; `requires_grad` flags, grads and
    the train/eval mode are restored afterwards.
    """
    params = dict(model.named_parameters())
    missing = [n for n in candidates if n not in params]
    if missing:
        raise ScoringError(f"candidate parameter '{missing[0]}' is not in the model")
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    wanted = set(candidates)
    for n, p in params.items():
        p.requires_grad_(n in wanted)
        p.grad = None
    model.eval()
    from gps_ds.tasks.base import model_device_dtype, move

    device, dtype = model_device_dtype(model)
    n_batches = n_samples = 0
    # Index of the first batch with a non-finite loss, kept on the device and read once at the
    # end: a per-batch `.item()` would stall an accelerator every batch. A non-finite batch
    # poisons the sums for good, so finding it at the end loses nothing but the wasted batches.
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    try:
        for inputs, labels in batches:
            if max_batches is not None and n_batches >= max_batches:
                break
            inputs, labels = move(inputs, device, dtype), move(labels, device)
            loss = loss_fn(model, inputs, labels)
            bad_here = ~torch.isfinite(loss.detach()) & (first_bad < 0)
            first_bad = torch.where(bad_here, torch.full_like(first_bad, n_batches), first_bad)
            loss.backward()
            n_batches += 1
            n_samples += _batch_size(labels)
            if progress is not None:
                progress.update(1)
        if n_batches == 0:
            raise ScoringError("the scoring pass saw no batches: the training data is empty")
        bad = int(first_bad)
        if bad >= 0:
            raise ScoringError(f"scoring loss is not finite at batch {bad}")
        scores = {}
        for n in candidates:
            grad = params[n].grad
            scores[n] = torch.zeros_like(params[n], dtype=torch.float32) if grad is None else grad.detach().float().abs()
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(saved_flags[n])
        model.train(was_training)
    return ScoreResult(scores, n_batches, n_samples)
