"""Foreground Dice / IoU at the original resolution: hand-worked masks, the crop/resize back from
a padded prediction, padding samples, and a 2-rank reduction equal to one process."""

import json
import math
import os
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from gps_ds.data.seg_transforms import JointTransform, valid_region
from gps_ds.tasks.segmentation_metrics import (SegmentationMeter, dice_iou, image_scores, logits_to_original)

DEADLINE_S = 120


def _gt_4x4() -> torch.Tensor:
    """4x4 ground truth, a 2x2 polyp in the top-left corner: |G| = 4."""
    g = torch.zeros(4, 4, dtype=torch.bool)
    g[:2, :2] = True
    return g


def test_everything_as_polyp_scores_far_below_one():
    # a square 4x4 original at S = 8 fills the whole input; logits +5 everywhere: |P| = 16, |P & G| = 4
    # Dice = 2 * 4 / (16 + 4) = 0.4, IoU = 4 / 16 = 0.25 (false positives count)
    logits = torch.full((1, 1, 8, 8), 5.0)
    dice, iou = image_scores(logits, [_gt_4x4()])
    assert dice.tolist() == [pytest.approx(0.4, abs=1e-15)] and iou.tolist() == [pytest.approx(0.25, abs=1e-15)]
    assert dice.dtype == torch.float64


def test_nothing_predicted_and_empty_ground_truth():
    nothing = torch.full((1, 1, 8, 8), -5.0)
    everything = torch.full((1, 1, 8, 8), 5.0)
    empty = torch.zeros(4, 4, dtype=torch.bool)
    assert [t.item() for t in image_scores(nothing, [_gt_4x4()])] == [0.0, 0.0]   # |P & G| = 0, G not empty
    assert [t.item() for t in image_scores(nothing, [empty])] == [1.0, 1.0]       # both empty: a perfect 1
    assert [t.item() for t in image_scores(everything, [empty])] == [0.0, 0.0]    # G empty, P not: 0
    p = torch.tensor([[True, False], [True, True]])
    g = torch.tensor([[True, True], [False, True]])
    # |P| = 3, |G| = 3, |P & G| = 2, |P | G| = 4: Dice 4/6, IoU 2/4
    assert [t.item() for t in dice_iou(p, g)] == [pytest.approx(2 / 3), pytest.approx(0.5)]


def _padded_6x4_logits() -> torch.Tensor:
    """S = 8 logits of a 4 (high) x 6 (wide) original: the resize makes it 8 wide, int(4 * 8/6 + .5) = 5
    high, rows 5..7 are padding (+100 there). Inside, l(y, x) = (x - 3.5) + 2 (y - 2), linear, so
    bilinear resampling reproduces it exactly."""
    y, x = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    logits = (x - 3.5) + 2 * (y - 2)
    logits[5:] = 100.0
    return logits[None, None]


def test_prediction_cropped_and_resized_back_to_original():
    # align_corners=False: output column j samples x = (j + .5) * 8/6 - .5 = 1/6, 3/2, 17/6, 25/6, 11/2, 41/6
    # -> x - 3.5 = -10/3, -2, -2/3, 2/3, 2, 10/3; output row i samples y = (i + .5) * 5/4 - .5
    # = 1/8, 11/8, 21/8, 31/8 -> 2 (y - 2) = -3.75, -1.25, 1.25, 3.75. Logit sums > 0:
    want = torch.tensor([[0, 0, 0, 0, 0, 0],   # row 0: largest is 10/3 - 3.75 < 0
                         [0, 0, 0, 0, 1, 1],   # row 1: 2 - 1.25 > 0, 2/3 - 1.25 < 0
                         [0, 0, 1, 1, 1, 1],   # row 2: -2/3 + 1.25 > 0, -2 + 1.25 < 0
                         [1, 1, 1, 1, 1, 1]],  # row 3: -10/3 + 3.75 > 0
                        dtype=torch.bool)
    restored = logits_to_original(_padded_6x4_logits()[0], 4, 6)
    assert restored.shape == (4, 6) and torch.equal(restored > 0, want)
    assert abs(restored[3, 0].item() - (-10 / 3 + 3.75)) < 1e-5
    # ground truth: the right half (columns 3..5), |G| = 12; |P| = 12, |P & G| = 2 + 3 + 3 = 8
    # Dice = 16 / 24 = 2/3, IoU = 8 / (12 + 12 - 8) = 1/2
    gt = torch.zeros(4, 6, dtype=torch.bool)
    gt[:, 3:] = True
    dice, iou = image_scores(_padded_6x4_logits(), [gt])
    assert dice.item() == pytest.approx(2 / 3, abs=1e-12) and iou.item() == pytest.approx(0.5, abs=1e-12)


def test_round_trip_through_the_data_transform():
    """A mask pushed through the evaluation transform (resize, bottom/right pad) and read back
    as logits scores close to 1 at the original resolution, for tall and wide originals."""
    rng = np.random.default_rng(0)
    for w, h in ((48, 30), (30, 52), (64, 64)):
        m = np.zeros((h, w), np.uint8)
        m[h // 4: h // 4 + h // 2, w // 5: w // 5 + w // 2] = 255
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        _, mask = JointTransform(32, train=False)(img, Image.fromarray(m))
        dice, iou = image_scores((mask[None] - 0.5) * 10, [torch.from_numpy(m)])  # uint8 0/255 original
        assert dice.item() > 0.93 and iou.item() > 0.87, (w, h, dice, iou)


def test_valid_region_marks_the_unpadded_pixels():
    region = valid_region([(4, 6), torch.zeros(6, 3)], 8)
    # 4 x 6 -> 5 x 8 (see above); 6 x 3 -> 8 high, int(3 * 8/6 + .5) = 4 wide
    assert region.shape == (2, 1, 8, 8) and region.dtype == torch.bool
    assert region[0, 0].sum().item() == 40 and region[0, 0, :5].all() and not region[0, 0, 5:].any()
    assert region[1, 0].sum().item() == 32 and region[1, 0, :, :4].all() and not region[1, 0, :, 4:].any()


def test_meter_skips_padding_and_averages_losses():
    exact = torch.full((1, 1, 8, 8), -5.0)
    exact[..., :4, :4] = 5.0  # 4x4 original at S = 8: the 2x2 corner becomes the 4x4 corner -> Dice = IoU = 1
    logits = torch.cat([torch.full((1, 1, 8, 8), 5.0), exact, torch.full((1, 1, 8, 8), -5.0)])
    gt_u8 = _gt_4x4().to(torch.uint8) * 255  # stored masks are 0/255 uint8
    meter = SegmentationMeter("cpu")
    meter.update(logits, [_gt_4x4(), gt_u8, torch.zeros(2, 2, dtype=torch.bool)],
                 torch.tensor([True, True, False]), torch.tensor([0.5, 1.5, float("nan")]))
    # images: everything-as-polyp (Dice .4, IoU .25) and exact (1, 1); the third is padding (it would
    # score 1, 1: nothing predicted on an empty mask) with a NaN loss
    got = meter.compute()
    assert got["count"] == 2 and got["eval_loss"] == pytest.approx(1.0)
    assert got["mdice"] == pytest.approx(0.7, abs=1e-15) and got["miou"] == pytest.approx(0.625, abs=1e-15)
    meter.update(logits[:1], [_gt_4x4()], torch.tensor([True]))  # no loss given for this batch
    got = meter.compute()
    assert got["count"] == 3 and got["eval_loss"] == pytest.approx(1.0)
    assert got["mdice"] == pytest.approx(1.8 / 3) and got["miou"] == pytest.approx(1.5 / 3)
    meter.reset()
    assert meter.compute() == {"mdice": pytest.approx(float("nan"), nan_ok=True),
                               "miou": pytest.approx(float("nan"), nan_ok=True), "count": 0, "eval_loss": None}


def test_meter_input_mistakes():
    meter = SegmentationMeter()
    logits = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="bool or uint8"):
        meter.update(logits, [torch.zeros(4, 4)], torch.tensor([True]))
    with pytest.raises(ValueError, match="original masks for a batch"):
        meter.update(logits, [], torch.tensor([True]))
    with pytest.raises(ValueError, match="per image"):
        meter.update(logits, [_gt_4x4()], torch.tensor([True]), torch.zeros(2))


# ----------------------------------------------------------------------------- two ranks
S = 16
SPLIT = 5  # rank 0: images 0..4 (one of them padding), rank 1: images 5..8 (two of them padding)
INVALID = {3, 7, 8}


def _case():
    """Nine images: random original sizes 5..24 a side, random logits, per-image losses."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 1, S, S, generator=g) * 2
    originals = []
    for _ in range(9):
        h, w = (int(v) for v in torch.randint(5, 25, (2,), generator=g))
        originals.append(torch.rand(h, w, generator=g) > 0.55)
    valid = torch.tensor([i not in INVALID for i in range(9)])
    losses = torch.rand(9, generator=g, dtype=torch.float64)
    return logits, originals, valid, losses


def _rank_main(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    logits, originals, valid, losses = _case()
    part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, 9)
    meter = SegmentationMeter("cpu")
    meter.update(logits[part], originals[part], valid[part], losses[part])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(meter.compute(), f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(DEADLINE_S + 30)
def test_two_rank_reduction_equals_one_process(tmp_path):
    ctx = mp.start_processes(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"2 ranks did not finish in {DEADLINE_S} s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    logits, originals, valid, losses = _case()
    one = SegmentationMeter("cpu")
    one.update(logits, originals, valid, losses)
    want = one.compute()
    # and independently of the meter: plain means of the per-image scores over the six valid images
    dice, iou = image_scores(logits, originals)
    keep = [i for i in range(9) if i not in INVALID]
    assert want["count"] == 6
    assert math.isclose(want["mdice"], float(np.mean(dice.numpy()[keep])), rel_tol=1e-12)
    assert math.isclose(want["miou"], float(np.mean(iou.numpy()[keep])), rel_tol=1e-12)
    assert math.isclose(want["eval_loss"], float(np.mean(losses.numpy()[keep])), rel_tol=1e-12)
    for got in ranks:
        assert got["count"] == want["count"]
        for key in ("mdice", "miou", "eval_loss"):
            assert math.isclose(got[key], want[key], rel_tol=1e-12, abs_tol=1e-15), (key, got, want)


class _HostReads(torch.overrides.TorchFunctionMode):
    """Records tensor -> Python reads (each one a device synchronisation on an accelerator)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_update_and_losses_never_read_the_device():
    """A CPU proxy for "no host sync per batch": update() and the losses call no .item(), .tolist(),
    bool(), float(), .cpu() on tensors; compute() reads the accumulator once."""
    from gps_ds.tasks.segmentation_losses import bce_soft_iou_loss

    logits, originals, valid, _ = _case()
    meter = SegmentationMeter("cpu")
    with _HostReads() as mode:
        masks = torch.stack([torch.zeros(1, S, S)] * len(originals))
        losses = bce_soft_iou_loss(logits, masks, region=valid_region(originals, S), reduction="none")
        meter.update(logits, originals, valid, losses)
        meter.update(logits, [o.to(torch.uint8) * 255 for o in originals], valid)
    assert mode.reads == []
    with _HostReads() as mode:
        meter.compute()
    assert mode.reads == ["tolist"]
