"""Training-step monitoring without a host sync per step.

Losses stay on the device; every `every` optimizer steps (and before anything is saved) one small
all-reduce tells every rank whether any rank has seen a non-finite loss, and at which step, so
all ranks stop together at the same check. The same check yields the mean loss of the window
and the throughput (global images per second) for logging.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from gps_ds import distributed as D

_NONE = float("inf")


@dataclass
class Window:
    """What one check reports."""

    steps: int  # optimizer steps in the window
    loss: float  # this rank's mean training loss over the window (nan when no step)
    images_per_s: float  # global
    step_s: float
    bad_step: int | None  # first step (over all ranks) with a non-finite loss
    bad_here: float | None  # that loss on this rank, if it was this rank's


class StepMonitor:
    def __init__(self, device: torch.device, global_batch: int) -> None:
        self.device = device
        self.global_batch = global_batch
        self._reset()

    def _reset(self) -> None:
        z = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_sum, self.losses = z.clone(), z.clone()
        self.bad_step = torch.full((), _NONE, dtype=torch.float64, device=self.device)
        self.bad_value = z.clone()
        self.steps = 0
        self.started = time.perf_counter()

    def restart_clock(self) -> None:
        """Time the window from now (a new epoch: the evaluation and checkpoint before it are not training)."""
        self.started = time.perf_counter()

    def add_loss(self, loss: torch.Tensor, step: int) -> None:
        """A micro-batch's loss at optimizer step `step` (device ops only)."""
        value = loss.detach().to(torch.float64)
        finite = torch.isfinite(value)
        first = finite.logical_not() & (self.bad_step == _NONE)
        self.bad_step = torch.where(first, torch.full_like(self.bad_step, step), self.bad_step)
        self.bad_value = torch.where(first, value, self.bad_value)
        self.loss_sum += torch.where(finite, value, torch.zeros_like(value))
        self.losses += 1

    def step_done(self) -> None:
        self.steps += 1

    def check(self) -> Window:
        """Collective: every rank calls it at the same points."""
        local_bad = self.bad_step.clone()
        D.all_reduce_(self.bad_step, "min")
        loss_sum, losses, bad, local, value = torch.stack(
            [self.loss_sum, self.losses, self.bad_step, local_bad, self.bad_value]).tolist()
        elapsed = time.perf_counter() - self.started
        steps = self.steps
        window = Window(steps=steps, loss=loss_sum / losses if losses else math.nan,
                        images_per_s=steps * self.global_batch / elapsed if steps and elapsed > 0 else 0.0,
                        step_s=elapsed / steps if steps else 0.0,
                        bad_step=None if bad == _NONE else int(bad),
                        bad_here=value if local != _NONE and local == bad else None)
        self._reset()
        return window
