"""Image classification: cross-entropy (or the recipe's mixup / smoothing loss), top-1."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from gps_ds.tasks.base import Meter, SumMeter, Task


class TopOneMeter(SumMeter):
    def __init__(self, device: torch.device) -> None:
        super().__init__(("correct", "count", "loss"), device)

    def update(self, outputs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, losses: torch.Tensor) -> None:
        valid = valid.to(outputs.device)
        correct = ((outputs.argmax(1) == targets) & valid).sum()
        self.add(correct, valid.sum(), (losses * valid).sum())

    def compute(self) -> dict[str, float]:
        from gps_ds.evaluation import TrainingError

        t = self.totals()
        if t["count"] == 0:
            raise TrainingError("the evaluation data is empty")
        return {"top1": 100.0 * t["correct"] / t["count"], "eval_loss": t["loss"] / t["count"], "count": int(t["count"])}


class ClassificationTask(Task):
    name = "classification"
    primary_metric = "top1"

    def __init__(self, cfg=None) -> None:
        """`cfg=None`: evaluation only (plain cross-entropy as training criterion)."""
        from gps_ds.data import transforms  # looked up here so a patched criterion is seen

        self.criterion = transforms.build_train_criterion(cfg.data) if cfg is not None else nn.CrossEntropyLoss()

    def task_score_loss(self):
        # A classifier's own loss is cross-entropy through the head (the scoring pass sees plain labels).
        from gps_ds.selection.losses import make_score_loss

        return make_score_loss("ce")

    def train_loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        return self.criterion(outputs.float(), targets)

    def eval_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs.float(), targets, reduction="none")

    def new_meter(self, device: torch.device) -> Meter:
        return TopOneMeter(device)

    def format(self, metrics: dict[str, float]) -> str:
        return f"top-1 {metrics['top1']:.2f}%, loss {metrics['eval_loss']:.4f}"
