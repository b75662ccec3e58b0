"""Evaluation: top-1 and loss over every sample exactly once, reduced exactly across ranks."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn as nn

from gps_ds import distributed as D


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, empty evaluation data): one line for the user."""


@dataclass
class EvalResult:
    top1: float
    loss: float
    count: int


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, dtype: torch.dtype) -> EvalResult:
    """Top-1 and mean loss over every evaluation sample exactly once, reduced across ranks."""
    was_training = model.training
    model.eval()
    correct = count = 0.0
    loss_sum = 0.0
    for batch in loader:
        images, labels, valid = _unpack_eval(batch)
        logits = model(images.to(device, dtype)).float()
        labels = labels.to(device)
        valid = valid.to(device)
        losses = nn.functional.cross_entropy(logits, labels, reduction="none")
        correct += float(((logits.argmax(1) == labels) & valid).sum())
        count += float(valid.sum())
        loss_sum += float((losses * valid).sum())
    model.train(was_training)
    correct, count, loss_sum = D.all_reduce_sum([correct, count, loss_sum])
    if count == 0:
        raise TrainingError("the evaluation data is empty")
    return EvalResult(100.0 * correct / count, loss_sum / count, int(count))


def _unpack_eval(batch):
    """(images, labels, valid): the exactly-once loader marks padding samples invalid."""
    if len(batch) >= 3:
        return batch[0], batch[1], batch[2].bool()
    images, labels = batch
    return images, labels, torch.ones(labels.shape[0], dtype=torch.bool)


def evaluate_delta(cfg, delta_path: str, split: str = "test") -> dict:
    """`gps-ds eval`: the config's model with a delta file applied, on the `split` data."""
    from gps_ds.data.loaders import make_eval_loader
    from gps_ds.delta import DeltaError, load_delta, load_delta_into_model
    from gps_ds.models import create_model_from_config
    from gps_ds.rules import classify
    from gps_ds.selection.pipeline import candidate_fingerprint

    rank, world = D.init_distributed()
    delta = load_delta(delta_path)
    model = create_model_from_config(cfg)
    expected = delta.meta.get("fingerprint")
    actual = candidate_fingerprint(model, classify(model, cfg.model.family, cfg.gps.rules))
    if expected and expected != actual:
        raise DeltaError(f"delta {delta_path} was trained on model '{delta.meta.get('model')}' "
                         f"(fingerprint {expected}); the config builds '{cfg.model.name}' ({actual})")
    load_delta_into_model(model, delta)
    batch = int(cfg.deepspeed.get("train_micro_batch_size_per_gpu", 32))
    loader = make_eval_loader(cfg.data, rank, world, batch_size_per_rank=batch, split=split)
    res = evaluate(model, loader, "cpu" if not torch.cuda.is_available() else f"cuda:{torch.cuda.current_device()}",
                   torch.float32)
    return {"delta": str(delta_path), "split": split, "top1": res.top1, "loss": res.loss, "count": res.count,
            "model": cfg.model.name, "meta": json.loads(json.dumps(delta.meta))}
