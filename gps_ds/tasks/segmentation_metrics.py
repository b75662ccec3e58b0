"""Foreground Dice / IoU of binary segmentation, per image at its original resolution.

The data pipeline resizes an image's longest side to ``S`` and pads bottom/right to
``S x S`` (:mod:`gps_ds.data.seg_transforms`). To score a prediction, its logits ``[1, S,
S]`` are cropped to the unpadded ``h x w`` (:func:`~gps_ds.data.seg_transforms.longest_side_shape`),
resized bilinearly (``align_corners=False``) to the original ``H x W`` and thresholded at
logit 0 (a pixel is foreground where the logit is ``> 0``, i.e. sigmoid ``> 0.5``). The
prediction ``P`` is compared with the original mask ``G`` (bool, or uint8 with foreground
``> 127`` as stored in the shards):

* ``Dice = 2 |P & G| / (|P| + |G|)``, ``IoU = |P & G| / |P | G|`` — of the foreground, so
  false positives count (predicting everything as foreground scores ``|G| / (H W)`` IoU,
  not 1);
* empty ground truth: ``Dice = IoU = 1`` when ``P`` is empty too, else ``0``.

``mDice`` / ``mIoU`` are means over images. :class:`SegmentationMeter` accumulates them on
the device (no host synchronisation per batch) and reduces them over ranks once.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from gps_ds.data.seg_transforms import longest_side_shape

# slots of the meter's accumulator
_DICE, _IOU, _COUNT, _LOSS, _LOSS_COUNT = range(5)


def foreground(mask: torch.Tensor) -> torch.Tensor:
    """An original mask as bool: bool stays, uint8 is ``> 127`` (the stored 0/255 masks)."""
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype == torch.uint8:
        return mask > 127
    raise ValueError(f"original masks must be bool or uint8 (0/255), got dtype {mask.dtype}")


def logits_to_original(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Logits ``[1, S, S]`` (or ``[S, S]``) of a padded input -> logits ``[H, W]`` of the
    original ``height x width`` image: crop the unpadded part, resize bilinearly (float32
    at least)."""
    x = logits.reshape(logits.shape[-2:]) if logits.ndim == 3 else logits
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"expected square logits [1, S, S], got {tuple(logits.shape)}")
    w, h = longest_side_shape(width, height, x.shape[-1])
    crop = x[:h, :w].to(torch.promote_types(x.dtype, torch.float32))
    return F.interpolate(crop[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]


def dice_iou(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground ``(Dice, IoU)`` of two bool masks of one shape, as float64 0-d tensors on
    their device (both 1 when both masks are empty)."""
    inter = (pred & gt).sum(dtype=torch.float64)
    total = pred.sum(dtype=torch.float64) + gt.sum(dtype=torch.float64)
    union = total - inter
    empty = union == 0
    dice = torch.where(empty, 1.0, 2.0 * inter / total.clamp_min(1.0))
    iou = torch.where(empty, 1.0, inter / union.clamp_min(1.0))
    return dice, iou


def image_scores(logits: torch.Tensor, originals: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ``(dice [B], iou [B])`` (float64, on the logits' device) of logits
    ``[B, 1, S, S]`` against original masks ``[H_i, W_i]``."""
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"segmentation logits must be [B, 1, S, S], got {tuple(logits.shape)}")
    if len(originals) != logits.shape[0]:
        raise ValueError(f"{len(originals)} original masks for a batch of {logits.shape[0]} logits")
    scores = []
    for lg, orig in zip(logits, originals):
        gt = foreground(orig.to(logits.device, non_blocking=True))
        if gt.ndim != 2:
            raise ValueError(f"original masks must be [H, W], got {tuple(orig.shape)}")
        pred = logits_to_original(lg, gt.shape[0], gt.shape[1]) > 0
        scores.append(torch.stack(dice_iou(pred, gt)))
    both = torch.stack(scores)
    return both[:, 0], both[:, 1]


class SegmentationMeter:
    """mDice / mIoU (and the mean per-image loss) over an evaluation pass.

    ``update`` per batch keeps float64 sums ``(dice, iou, count, loss, loss count)`` in one
    tensor on ``device`` and never synchronises with the host; ``compute`` sums that tensor
    over ranks (when ``torch.distributed`` is initialised with more than one rank: call it
    on every rank) and reads it once."""

    def __init__(self, device: Optional[torch.device | str] = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.sums = torch.zeros(5, dtype=torch.float64, device=self.device)

    def reset(self) -> None:
        self.sums.zero_()

    def update(self, logits: torch.Tensor, originals: Sequence[torch.Tensor], valid: torch.Tensor,
               losses: Optional[torch.Tensor] = None) -> None:
        """Add a batch: logits ``[B, 1, S, S]``, ``originals`` (``B`` masks at original
        resolution), ``valid`` bool ``[B]`` (False: padding/unreadable, counted nowhere),
        ``losses`` per-image ``[B]`` or None."""
        valid = valid.to(self.device, torch.bool, non_blocking=True).reshape(-1)
        if valid.shape[0] != logits.shape[0]:
            raise ValueError(f"valid has {valid.shape[0]} entries for a batch of {logits.shape[0]}")
        dice, iou = image_scores(logits, originals)
        dice, iou = dice.to(self.device), iou.to(self.device)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        n = valid.sum(dtype=torch.float64)
        if losses is None:
            loss, loss_n = zero, zero
        else:
            per_image = losses.detach().to(self.device, torch.float64).reshape(-1)
            if per_image.shape[0] != valid.shape[0]:
                raise ValueError(f"losses must be per image [B], got shape {tuple(losses.shape)}")
            loss, loss_n = torch.where(valid, per_image, zero).sum(), n
        # where, not a product: a padding slot's NaN must not poison the sums
        self.sums += torch.stack([torch.where(valid, dice, zero).sum(), torch.where(valid, iou, zero).sum(),
                                  n, loss, loss_n])

    def compute(self) -> dict[str, Optional[float]]:
        """``{"mdice", "miou", "count", "eval_loss"}`` over all ranks (``nan`` scores when
        no image was counted; ``eval_loss`` None when no losses were given)."""
        from gps_ds import distributed as D

        sums = D.all_reduce_(self.sums.clone())
        dice, iou, count, loss, loss_count = sums.tolist()  # the one host read
        return {
            "mdice": dice / count if count else float("nan"),
            "miou": iou / count if count else float("nan"),
            "count": int(count),
            "eval_loss": loss / loss_count if loss_count else None,
        }
