"""The task interface: how a batch becomes a loss, a scoring loss and evaluation metrics.

The trainer, the scoring pass, `gps-ds eval` and the benchmarks talk to a `Task` only, so
classification and segmentation share one loop. Metrics accumulate in one device tensor per
evaluation (no host sync per batch) and are reduced across ranks by one all-reduce of that
tensor, so an evaluation over uneven shards equals one process's up to float64 rounding.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

ScoreLoss = Callable[[nn.Module, Any, Any], torch.Tensor]


class Meter:
    """Accumulates an evaluation's metrics on the device; `compute()` reduces and reads them once."""

    def update(self, outputs: torch.Tensor, targets: Any, valid: torch.Tensor, losses: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class Task:
    name: ClassVar[str]
    #: the evaluation metric that picks the best epoch (higher is better)
    primary_metric: ClassVar[str]

    def check(self, cfg) -> None:
        """Refuse settings this task cannot run (one line naming the config key)."""

    def to_device(self, inputs: Any, targets: Any, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
        """Inputs to `device` in the model's `dtype`, targets to `device` (non-blocking)."""
        return move(inputs, device, dtype), move(targets, device)

    def forward(self, model: nn.Module, inputs: Any, targets: Any = None) -> torch.Tensor:
        return model(inputs)

    def train_loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        raise NotImplementedError

    def eval_losses(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """One loss value per sample (for the evaluation loss)."""
        raise NotImplementedError

    def new_meter(self, device: torch.device) -> Meter:
        raise NotImplementedError

    def task_score_loss(self) -> ScoreLoss:
        """`gps.loss = "task"`: the task's own training loss through the model (the paper's choice for SAM)."""

        def loss(model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
            device, dtype = model_device_dtype(model)
            inputs, targets = self.to_device(inputs, targets, device, dtype)
            return self.train_loss(self.forward(model, inputs, targets), targets)

        return loss

    def format(self, metrics: dict[str, float]) -> str:
        """One human line for the console."""
        return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def move(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Tensors (also inside tuples/lists) to `device`; floating tensors to `dtype` when given."""
    if isinstance(x, torch.Tensor):
        if dtype is not None and x.is_floating_point():
            return x.to(device, dtype, non_blocking=True)
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(move(v, device, dtype) for v in x)
    return x


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model computes: the device and floating dtype of its first parameter (also
    correct for ZeRO-3 placeholders, which keep device and dtype)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


class SumMeter(Meter):
    """Sums of named quantities in one float64 device tensor; `compute` all-reduces it once."""

    def __init__(self, names: tuple[str, ...], device: torch.device) -> None:
        self.names = names
        self.sums = torch.zeros(len(names), dtype=torch.float64, device=device)

    def add(self, *values: torch.Tensor) -> None:
        self.sums += torch.stack([v.to(torch.float64) for v in values])

    def totals(self) -> dict[str, float]:
        from gps_ds import distributed as D

        D.all_reduce_(self.sums)
        return dict(zip(self.names, self.sums.tolist()))
