"""Evaluation: a task's metrics over every sample exactly once, reduced exactly across ranks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN loss, empty evaluation data): one line for the user."""


@torch.no_grad()
def evaluate_task(model: nn.Module, loader: Iterable, task, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """The task's metrics over `loader` (EvalBatch: inputs, targets, valid, keys). Everything stays
    on `device`; the sums are read once, after one all-reduce."""
    was_training = model.training
    model.eval()
    meter = task.new_meter(device)
    try:
        for batch in loader:
            inputs, targets, valid = _unpack_eval(batch)
            inputs, targets = task.to_device(inputs, targets, device, dtype)
            outputs = task.forward(model, inputs, targets)
            meter.update(outputs, targets, valid.to(device, non_blocking=True), task.eval_losses(outputs, targets))
    finally:
        model.train(was_training)
    return meter.compute()


@dataclass
class EvalResult:
    top1: float
    loss: float
    count: int


def evaluate(model: nn.Module, loader, device, dtype: torch.dtype) -> EvalResult:
    """Top-1 and mean loss of a classifier (the classification task's metrics)."""
    from gps_ds.tasks.classification import ClassificationTask

    m = evaluate_task(model, loader, ClassificationTask(), torch.device(device), dtype)
    return EvalResult(m["top1"], m["eval_loss"], int(m["count"]))


def _unpack_eval(batch):
    """(inputs, targets, valid): the exactly-once loader marks padding samples invalid."""
    if len(batch) >= 3:
        return batch[0], batch[1], batch[2].bool()
    inputs, targets = batch
    n = targets.shape[0] if isinstance(targets, torch.Tensor) else len(targets[0])
    return inputs, targets, torch.ones(n, dtype=torch.bool)


def evaluate_delta(cfg, delta_path: str, split: str = "test") -> dict:
    """`gps-ds eval`: the config's model with a delta file applied, on the `split` data, on this
    rank's accelerator (every rank evaluates its share; the metrics are reduced across ranks)."""
    from gps_ds import distributed as D
    from gps_ds.data.loaders import make_eval_loader
    from gps_ds.delta import DeltaError, load_delta
    from gps_ds.methods import get_method
    from gps_ds.models import create_model_from_config
    from gps_ds.rules import classify
    from gps_ds.selection.pipeline import candidate_fingerprint
    from gps_ds.tasks import build_task

    rank, world = D.init_distributed()
    device = D.accelerator_device()
    delta = load_delta(delta_path)
    task = build_task(cfg)
    model = create_model_from_config(cfg)
    from gps_ds.data.transforms import resolve_data

    data = resolve_data(cfg.data, model)  # the model's normalisation and crop, as the trainer used
    roles = classify(model, cfg.model.family, cfg.gps.rules)
    expected = delta.meta.get("fingerprint")
    actual = candidate_fingerprint(model, roles)
    if expected and expected != actual:
        raise DeltaError(f"delta {delta_path} was trained on model '{delta.meta.get('model')}' "
                         f"(fingerprint {expected}); the config builds '{cfg.model.name}' ({actual})")
    method = get_method(delta.meta.get("method", "gps"), json.loads(delta.meta.get("method_options", "{}")))
    model = method.apply_delta(model, roles, delta).to(device)
    batch = int(cfg.deepspeed.get("train_micro_batch_size_per_gpu", 32))
    loader = make_eval_loader(data, rank, world, batch_size_per_rank=batch, split=split, device=device)
    metrics = evaluate_task(model, loader, task, device, torch.float32)
    return {"delta": str(delta_path), "split": split, "task": task.name, **metrics, "loss": metrics["eval_loss"],
            "model": cfg.model.name, "meta": json.loads(json.dumps(delta.meta))}
