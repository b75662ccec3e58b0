"""The paper's transforms against torchvision references, SupCon views, joint image+mask
transforms, mixup from the config, and the DataConfig model."""

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torchvision import transforms as T

from gps_ds.data import (DataConfig, build_eval_transform, build_mixup, build_train_transform,
                         build_two_view_transform)
from gps_ds.data import synthetic as syn
from gps_ds.data.samples import stack
from gps_ds.data.seg_transforms import JointTransform, longest_side_shape
from gps_ds.data.transforms import build_batch_normalize

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def image():
    return syn.random_image(np.random.default_rng(0), 70, 45)


def test_fgvc_eval_is_resize_center_crop_imagenet_norm(image):
    cfg = DataConfig(recipe="fgvc", image_size=32)
    ref = T.Compose([T.Resize(int(32 / 0.875), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                     T.ToTensor(), T.Normalize(MEAN, STD)])
    assert torch.allclose(build_eval_transform(cfg)(image), ref(image), atol=1e-6)


def test_vtab_resizes_to_square_without_augmentation(image):
    cfg = DataConfig(recipe="vtab", image_size=32)
    ref = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(MEAN, STD)])
    for tf in (build_train_transform(cfg), build_eval_transform(cfg)):
        assert torch.allclose(tf(image), ref(image), atol=1e-6)


def test_fgvc_train_random_resized_crop_and_flip(image):
    cfg = DataConfig(recipe="fgvc", image_size=32)
    tf = build_train_transform(cfg)
    from timm.data.transforms import RandomResizedCropAndInterpolation

    names = [type(t).__name__ for t in tf.transforms]
    assert isinstance(tf.transforms[0], RandomResizedCropAndInterpolation) and names[1] == "RandomHorizontalFlip"
    assert "ColorJitter" not in names and tf.transforms[0].scale == (0.08, 1.0)
    a, b = tf(image), tf(image)
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)


def test_fast_crop_matches_timm_crop():
    import io
    import random

    from gps_ds.data.samples import SampleProcessor
    from gps_ds.data.transforms import FastRandomResizedCrop

    cfg = DataConfig(recipe="fgvc", image_size=64)
    fast = build_train_transform(cfg, uint8=True)
    slow = build_train_transform(cfg.model_copy(update={"fast_crop": False}), uint8=True)
    assert isinstance(fast, FastRandomResizedCrop) and SampleProcessor(fast).lazy and not SampleProcessor(slow).lazy
    assert not SampleProcessor(build_two_view_transform(cfg)).lazy
    assert type(build_train_transform(cfg)).__name__ == "Compose"  # float output: timm's transform

    def compare(img_bytes, seed, lazy):
        img = Image.open(io.BytesIO(img_bytes))
        random.seed(seed)
        torch.manual_seed(seed)
        a = fast(img if lazy else img.convert("RGB"))
        random.seed(seed)
        torch.manual_seed(seed)
        b = slow(Image.open(io.BytesIO(img_bytes)).convert("RGB"))
        assert a.shape == b.shape == (3, 64, 64) and a.dtype == b.dtype == torch.uint8
        return (a.float() - b.float()).abs().mean().item(), img.size

    rng = np.random.default_rng(3)
    small = syn.jpeg_bytes(syn.random_image(rng, 90, 70), quality=95)
    for seed in range(6):  # same crop and flip; torch's resampling reproduces PIL's
        diff, _ = compare(small, seed, lazy=True)
        assert diff < 1.0
    big = syn.jpeg_bytes(syn.random_image(rng, 1000, 800), quality=95)
    drafted = 0
    for seed in range(6):
        diff, size = compare(big, seed, lazy=True)
        assert diff < 4.0  # large crops decoded at reduced scale: still the same picture
        drafted += size != (1000, 800)
        assert compare(big, seed, lazy=False)[0] < 1.0  # already decoded: full resolution
    assert drafted >= 3


@pytest.mark.parametrize("recipe", ["fgvc", "vtab"])
def test_uint8_path_plus_batch_normalize_equals_float_path(image, recipe):
    cfg = DataConfig(recipe=recipe, image_size=24)
    x8 = build_eval_transform(cfg, uint8=True)(image)
    assert x8.dtype == torch.uint8
    batch = build_batch_normalize(cfg)(stack([x8, x8]))
    assert batch.is_contiguous() and batch.shape == (2, 3, 24, 24)
    assert torch.allclose(batch[0], build_eval_transform(cfg)(image), atol=1e-5)


def test_two_view_supcon_augmentation(image):
    cfg = DataConfig(recipe="fgvc", image_size=32)
    two = build_two_view_transform(cfg)
    parts = {type(t).__name__: t for t in two.transform.transforms}
    assert parts["RandomResizedCropAndInterpolation"].scale == (0.2, 1.0)
    assert parts["RandomHorizontalFlip"].p == 0.5
    assert parts["RandomApply"].p == 0.8 and type(parts["RandomApply"].transforms[0]).__name__ == "ColorJitter"
    assert parts["RandomGrayscale"].p == 0.2
    v1, v2 = two(image)
    assert v1.shape == v2.shape == (3, 32, 32) and not torch.equal(v1, v2)


def _position_image(w, h):
    """Red channel 255 inside a box in the top-left quarter, mask = the same box."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[2:h // 2, 3:w // 3, 0] = 255
    arr[..., 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]  # left-right gradient
    mask = np.where(arr[..., 0] > 0, 255, 0).astype(np.uint8)
    return Image.fromarray(arr), Image.fromarray(mask, mode="L")


def test_joint_transform_longest_side_pad_and_identical_flips():
    img, mask = _position_image(60, 40)
    assert longest_side_shape(60, 40, 32) == (32, 21)
    tf = JointTransform(32, train=False)
    x, m = tf(img, mask)
    assert x.shape == (3, 32, 32) and m.shape == (1, 32, 32)
    assert torch.all(x[:, 21:, :] == 0) and torch.all(m[:, 21:, :] == 0)  # bottom padding
    x0, m0 = x[:, :21], m[:, :21]  # the unpadded region, no flip

    combos = {}
    for h in (False, True):
        for v in (False, True):
            fx, fm = x0, m0
            if h:
                fx, fm = fx.flip(-1), fm.flip(-1)
            if v:
                fx, fm = fx.flip(-2), fm.flip(-2)
            combos[(h, v)] = (fx, fm)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x, m = JointTransform(32, hflip=0.5, vflip=0.5, train=True)(img, mask)
        assert torch.all(x[:, 21:] == 0) and torch.all(m[:, 21:] == 0)
        match = [c for c, (fx, fm) in combos.items() if torch.equal(x[:, :21], fx)]
        assert len(match) == 1
        assert torch.equal(m[:, :21], combos[match[0]][1])  # the mask got the image's flips
        seen.add(match[0])
    assert len(seen) >= 3  # flips did happen, both kinds
    torch.manual_seed(0)
    assert torch.equal(JointTransform(32, hflip=1.0, vflip=1.0)(img, mask)[1][:, :21], combos[(True, True)][1])
    with pytest.raises(ValueError, match="differ"):
        tf(img, mask.resize((10, 10)))


def test_build_mixup_from_config():
    cfg = DataConfig(mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1})
    mix = build_mixup(cfg, num_classes=5)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.label_smoothing, mix.num_classes) == (0.8, 1.0, 0.1, 5)
    x, y = mix(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert y.shape == (4, 5) and torch.allclose(y.sum(1), torch.ones(4))
    assert build_mixup(DataConfig(), 5) is None
    assert build_mixup(DataConfig(mixup={"label_smoothing": 0.1}), 5) is None


def test_data_config_model():
    cfg = DataConfig()
    assert cfg.size == 224 and DataConfig(recipe="segmentation").size == 1024 and DataConfig(image_size=96).size == 96
    assert cfg.workers == 4 and cfg.few_shot is None and cfg.steps_per_epoch is None
    with pytest.raises(ValidationError, match="extra"):
        DataConfig(batch_size=32)
    with pytest.raises(ValidationError, match="extra"):
        DataConfig(mixup={"alpha": 1})
    with pytest.raises(ValidationError, match="segmentation"):
        DataConfig(recipe="segmentation", mixup={"cutmix_alpha": 1.0})
    with pytest.raises(ValidationError):
        DataConfig(recipe="cifar")
    with pytest.raises(ValidationError, match="mean and data.std"):
        DataConfig(mean=(0.5, 0.5, 0.5))
    round_trip = DataConfig.model_validate_json(DataConfig(train=["a.tar", "b.tar"], few_shot=4).model_dump_json())
    assert round_trip.train == ["a.tar", "b.tar"] and round_trip.few_shot == 4
