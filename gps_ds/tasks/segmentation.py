"""Binary segmentation with SAM (polyp segmentation on Kvasir-SEG): BCE + soft IoU (the paper's
loss) or Dice + BCE on mask logits; foreground Dice / IoU per image at its original resolution."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from gps_ds.tasks.base import Meter, Task, move


class SegmentationTask(Task):
    name = "segmentation"
    primary_metric = "mdice"

    def __init__(self, cfg) -> None:
        from gps_ds.tasks import segmentation_losses as L

        self.cfg = cfg.task
        self.loss_fn = {"bce_iou": L.bce_soft_iou_loss, "dice_bce": L.dice_bce_loss}[cfg.task.loss]
        self._generator: torch.Generator | None = None

    def check(self, cfg) -> None:
        if cfg.train.method == "gps" and cfg.gps.loss != "task" and cfg.gps.scheme in ("gps", "net", "layer"):
            raise ValueError(f"gps.loss '{cfg.gps.loss}' needs a classifier; segmentation scores with "
                             f"gps.loss='task' (its own training loss, as the paper does for SAM)")
        if cfg.data.recipe != "segmentation":
            raise ValueError(f"data.recipe is '{cfg.data.recipe}'; the segmentation task reads "
                             f"data.recipe='segmentation' shards (image + mask)")

    def to_device(self, inputs: Any, targets: Any, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
        if isinstance(targets, (tuple, list)):  # evaluation: (masks, original-resolution masks)
            return move(inputs, device, dtype), (move(targets[0], device), move(list(targets[1]), device))
        return move(inputs, device, dtype), move(targets, device)

    def _boxes(self, masks: torch.Tensor, training: bool) -> torch.Tensor | None:
        if self.cfg.prompt == "none":
            return None
        from gps_ds.models.sam import boxes_from_masks

        jitter = self.cfg.box_jitter if training else 0.0
        if training and self._generator is None:
            self._generator = torch.Generator(device=masks.device).manual_seed(self.cfg.seed)
        return boxes_from_masks(masks, jitter=jitter, generator=self._generator if training else None)

    def forward(self, model: nn.Module, inputs: torch.Tensor, targets: Any = None) -> torch.Tensor:
        masks = targets[0] if isinstance(targets, (tuple, list)) else targets
        boxes = self._boxes(masks, model.training) if masks is not None else None
        return model(inputs) if boxes is None else model(inputs, boxes)

    def train_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(outputs.float(), targets.float())

    def eval_losses(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        from gps_ds.data.seg_transforms import valid_region

        masks, originals = targets
        region = valid_region(originals, masks.shape[-1], masks.device)  # padding counts nowhere
        return self.loss_fn(outputs.float(), masks.float(), region=region, reduction="none")

    def new_meter(self, device: torch.device) -> Meter:
        from gps_ds.tasks.segmentation_metrics import SegmentationMeter

        return _OriginalsMeter(SegmentationMeter(device))

    def pictures(self, model: nn.Module, loader, out_dir, split: str, device: torch.device,
                 dtype: torch.dtype) -> list:
        """PNG panels (image, ground truth, prediction, overlay) of the first images of `split`
        (the paper's Fig. 11); every rank runs the same forwards, rank 0 writes its own images."""
        from gps_ds.tasks.segmentation_pictures import write_panels

        return write_panels(model, loader, self, out_dir, split, device, dtype, count=self.cfg.pictures)

    def format(self, metrics: dict[str, float]) -> str:
        return f"mDice {metrics['mdice']:.4f}, mIoU {metrics['miou']:.4f}, loss {metrics['eval_loss']:.4f}"


class _OriginalsMeter(Meter):
    """Hands the original-resolution masks of an evaluation batch to the segmentation meter."""

    def __init__(self, meter) -> None:
        self.meter = meter

    def update(self, outputs: torch.Tensor, targets: Any, valid: torch.Tensor, losses: torch.Tensor) -> None:
        self.meter.update(outputs.float(), list(targets[1]), valid, losses)

    def compute(self) -> dict[str, float]:
        from gps_ds.evaluation import TrainingError

        metrics = self.meter.compute()
        if metrics["count"] == 0:
            raise TrainingError("the evaluation data is empty")
        return metrics
