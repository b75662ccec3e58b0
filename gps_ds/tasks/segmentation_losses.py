"""Binary segmentation losses on logits ``[B, 1, H, W]``.

* :func:`bce_soft_iou_loss` — the paper's SAM polyp loss: binary cross-entropy + soft IoU.
* :func:`dice_bce_loss` — binary cross-entropy + soft Dice.

Both are computed per image and then averaged over images (``reduction="mean"``) or
returned per image (``reduction="none"``, shape ``[B]``, what evaluation reports). The
per-image loss is ``BCE_i + (1 - overlap_i)`` where ``BCE_i`` is the mean binary
cross-entropy over the image's counted pixels and ``p = sigmoid(logits)``:

* soft IoU:  ``1 - (sum p*t + eps) / (sum p + sum t - sum p*t + eps)``
* soft Dice: ``1 - (2 sum p*t + eps) / (sum p + sum t + eps)``

``region`` (bool, broadcastable to the logits) marks the pixels that count — the unpadded
part of a padded input (:func:`gps_ds.data.seg_transforms.valid_region` builds it);
pixels outside it enter neither term. ``eps = 1`` by default (the usual smoothing: an
empty target with a near-zero prediction costs near zero instead of a full 1). The
computation runs in float32 at least (float64 inputs stay float64), on the inputs' device.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "none"]


def _prepare(logits: torch.Tensor, target: torch.Tensor,
             region: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, target, counted)`` as ``[B, N]``: logits and target in one float dtype,
    ``counted`` bool."""
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"segmentation logits must be [B, 1, H, W], got {tuple(logits.shape)}")
    if target.shape != logits.shape:
        raise ValueError(f"segmentation target shape {tuple(target.shape)} differs from logits {tuple(logits.shape)}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    b = logits.shape[0]
    x = logits.to(dtype).reshape(b, -1)
    t = target.to(dtype).reshape(b, -1)
    if region is None:
        return x, t, torch.ones_like(x, dtype=torch.bool)
    if region.dtype != torch.bool:
        raise ValueError(f"region must be a bool mask of valid pixels, got dtype {region.dtype}")
    return x, t, region.to(logits.device).expand_as(logits).reshape(b, -1)


def _bce(x: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-image mean BCE over the counted pixels (0 for an image with none). ``where``, not
    a product, so that whatever the padding holds (even inf) cannot leak in."""
    per_pixel = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    return torch.where(m, per_pixel, 0.0).sum(1) / m.sum(1).clamp_min(1).to(x.dtype)


def _soft(x: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: ``sum p*t``, ``sum p``, ``sum t`` over the counted pixels."""
    p = torch.where(m, torch.sigmoid(x), 0.0)
    t = torch.where(m, t, 0.0)
    return (p * t).sum(1), p.sum(1), t.sum(1)


def _reduce(per_image: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "none":
        return per_image
    if reduction == "mean":
        return per_image.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def bce_soft_iou_loss(logits: torch.Tensor, target: torch.Tensor, region: Optional[torch.Tensor] = None,
                      reduction: Reduction = "mean", eps: float = 1.0) -> torch.Tensor:
    """BCE (mean over pixels) + soft IoU loss, per image, then ``reduction`` over images.

    ``logits``, ``target`` (0/1, float or bool): ``[B, 1, H, W]``; ``region``: bool, which
    pixels count (default all). Returns a scalar (``"mean"``) or ``[B]`` (``"none"``)."""
    x, t, m = _prepare(logits, target, region)
    inter, p_sum, t_sum = _soft(x, t, m)
    iou_loss = 1.0 - (inter + eps) / (p_sum + t_sum - inter + eps)
    return _reduce(_bce(x, t, m) + iou_loss, reduction)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, region: Optional[torch.Tensor] = None,
                  reduction: Reduction = "mean", eps: float = 1.0) -> torch.Tensor:
    """BCE (mean over pixels) + soft Dice loss, per image, then ``reduction`` over images.
    Arguments as in :func:`bce_soft_iou_loss`."""
    x, t, m = _prepare(logits, target, region)
    inter, p_sum, t_sum = _soft(x, t, m)
    dice_loss = 1.0 - (2.0 * inter + eps) / (p_sum + t_sum + eps)
    return _reduce(_bce(x, t, m) + dice_loss, reduction)
