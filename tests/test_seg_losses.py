"""Segmentation losses on logits: hand-worked 2x2 values, a float64 reference, padding regions."""

import math

import pytest
import torch
import torch.nn.functional as F

from gps_ds.tasks.segmentation_losses import bce_soft_iou_loss, dice_bce_loss

LN3 = math.log(3.0)


def _hand_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Image 0: logits [[0, ln 3], [-ln 3, 0]] -> p = [[.5, .75], [.25, .5]], target [[1, 1], [0, 0]].
    Image 1: logits all 0 -> p = .5 everywhere, target all 0."""
    logits = torch.tensor([[[[0.0, LN3], [-LN3, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    return logits, target


# Image 0, BCE per pixel: -ln .5 = ln 2, -ln .75 = ln(4/3), -ln(1 - .25) = ln(4/3), ln 2
#   -> mean (2 ln 2 + 2 ln(4/3)) / 4 = ln(8/3) / 2.
#   sum p t = .5 + .75 = 1.25, sum p = 2, sum t = 2.
#   soft IoU, eps 1: 1 - (1.25 + 1) / (2 + 2 - 1.25 + 1) = 1 - 2.25 / 3.75 = 0.4
#   soft Dice, eps 1: 1 - (2.5 + 1) / (4 + 1) = 0.3
#   eps 0: IoU loss 1 - 1.25 / 2.75 = 6/11, Dice loss 1 - 2.5 / 4 = 0.375
# Image 1: BCE ln 2 everywhere; sum p t = 0, sum p = 2, sum t = 0
#   soft IoU, eps 1: 1 - 1 / 3 = 2/3; soft Dice, eps 1: 1 - 1 / 3 = 2/3
BCE0, BCE1 = math.log(8 / 3) / 2, math.log(2.0)


def test_bce_soft_iou_hand_computed():
    logits, target = _hand_batch()
    per_image = bce_soft_iou_loss(logits, target, reduction="none")
    assert per_image.shape == (2,)
    assert torch.allclose(per_image, torch.tensor([BCE0 + 0.4, BCE1 + 2 / 3], dtype=torch.float64), atol=1e-12)
    mean = bce_soft_iou_loss(logits, target)
    assert mean.ndim == 0 and abs(mean.item() - (BCE0 + 0.4 + BCE1 + 2 / 3) / 2) < 1e-12
    eps0 = bce_soft_iou_loss(logits[:1], target[:1], eps=0.0)
    assert abs(eps0.item() - (BCE0 + 6 / 11)) < 1e-12


def test_dice_bce_hand_computed():
    logits, target = _hand_batch()
    per_image = dice_bce_loss(logits, target, reduction="none")
    assert torch.allclose(per_image, torch.tensor([BCE0 + 0.3, BCE1 + 2 / 3], dtype=torch.float64), atol=1e-12)
    assert abs(dice_bce_loss(logits[:1], target[:1], eps=0.0).item() - (BCE0 + 0.375)) < 1e-12


def _reference(logits, target, region, overlap, eps):
    """Per image: select the region's pixels, then F.binary_cross_entropy_with_logits (mean)
    + 1 - the soft overlap, all in float64."""
    out = []
    for x, t, r in zip(logits.double(), target.double(), region):
        x, t = x[r], t[r]
        p = torch.sigmoid(x)
        inter, ps, ts = (p * t).sum(), p.sum(), t.sum()
        if overlap == "iou":
            soft = (inter + eps) / (ps + ts - inter + eps)
        else:
            soft = (2 * inter + eps) / (ps + ts + eps)
        out.append(F.binary_cross_entropy_with_logits(x, t) + 1 - soft)
    return torch.stack(out)


@pytest.mark.parametrize("fn,overlap", [(bce_soft_iou_loss, "iou"), (dice_bce_loss, "dice")])
@pytest.mark.parametrize("eps", [1.0, 1e-6])
def test_losses_match_float64_reference_with_region(fn, overlap, eps):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 5, 7, generator=g, dtype=torch.float64) * 3
    target = (torch.rand(3, 1, 5, 7, generator=g) > 0.6).double()
    region = torch.zeros(3, 1, 5, 7, dtype=torch.bool)
    region[0, :, :4, :7] = True   # padded at the bottom
    region[1, :, :5, :3] = True   # padded at the right
    region[2] = True              # no padding
    want = _reference(logits, target, region, overlap, eps)
    got = fn(logits, target, region=region, reduction="none", eps=eps)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    full = fn(logits, target, reduction="none", eps=eps)
    assert torch.allclose(full, _reference(logits, target, torch.ones_like(region), overlap, eps), atol=1e-12)
    assert abs(fn(logits, target, region=region, eps=eps).item() - want.mean().item()) < 1e-12


def test_padding_outside_region_cannot_leak():
    """The 2x2 hand batch inside a 3x3 padded frame full of garbage scores as the 2x2 batch."""
    logits, target = _hand_batch()
    big = torch.full((2, 1, 3, 3), float("inf"), dtype=torch.float64)
    big[..., 2, 0] = -1e9
    big[..., 2, 2] = float("nan")
    big[..., :2, :2] = logits
    big_t = torch.ones(2, 1, 3, 3, dtype=torch.float64)
    big_t[..., :2, :2] = target
    region = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    region[..., :2, :2] = True
    for fn in (bce_soft_iou_loss, dice_bce_loss):
        got = fn(big, big_t, region=region, reduction="none")
        assert torch.allclose(got, fn(logits, target, reduction="none"), atol=1e-12)


def test_float32_and_bf16_inputs_and_gradients():
    logits, target = _hand_batch()
    x = logits.float().requires_grad_()
    loss = bce_soft_iou_loss(x, target.bool())
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad is not None and torch.isfinite(x.grad).all()
    assert abs(loss.item() - (BCE0 + 0.4 + BCE1 + 2 / 3) / 2) < 1e-6
    low = dice_bce_loss(logits.bfloat16(), target)
    assert low.dtype == torch.float32  # computed in float32, not bf16


def test_user_mistakes():
    logits, target = _hand_batch()
    with pytest.raises(ValueError, match="target shape"):
        bce_soft_iou_loss(logits, target[:, :, :1])
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        dice_bce_loss(logits[:, 0], target[:, 0])
    with pytest.raises(ValueError, match="bool mask"):
        bce_soft_iou_loss(logits, target, region=torch.ones_like(logits))
    with pytest.raises(ValueError, match="reduction"):
        bce_soft_iou_loss(logits, target, reduction="sum")
