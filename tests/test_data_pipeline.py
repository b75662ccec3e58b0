"""The accelerator input pipeline: uint8 batches out of the DataLoader, normalised and mixed on the
loader's device; normalisation and crop from the model's timm pretrained_cfg unless configured;
workers/prefetch/pin_memory config keys."""

import inspect

import numpy as np
import pytest
import timm
import torch

from gps_ds.config import ConfigError, load_config
from gps_ds.data import DataConfig, make_eval_loader, make_train_loader
from gps_ds.data import loaders as loaders_mod
from gps_ds.data.transforms import build_eval_transform, build_mixup, resolve_data

IN21K = "vit_base_patch16_224.augreg_in21k"


def _by_hand(x8: torch.Tensor, mean, std) -> torch.Tensor:
    """The float path written out: ToTensor (x / 255) then Normalize, in float64."""
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    return (x8.double() / 255.0 - m) / s


def _digits_cfg(digits, **kw) -> DataConfig:
    return DataConfig(train=str(digits), test=str(digits), recipe="digits", image_size=16, workers=0, **kw)


def test_batches_leave_the_loader_uint8_and_are_normalised_on_the_device(digits):
    model = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=16)
    cfg = resolve_data(_digits_cfg(digits), model)  # test_vit's pretrained_cfg: mean = std = 0.5
    loader = make_eval_loader(cfg, 0, 1, 64, device="cpu")
    loader.set_epoch(0)
    raw = [b.inputs for b in loader.raw()]
    assert raw and all(x.dtype == torch.uint8 and x.shape[1:] == (3, 16, 16) for x in raw)
    loader.set_epoch(0)
    done = [b.inputs for b in loader]
    assert len(done) == len(raw)
    for x8, x in zip(raw, done):
        assert x.dtype == torch.float32 and x.device == torch.device("cpu")
        assert torch.allclose(x.double(), _by_hand(x8, (0.5,) * 3, (0.5,) * 3), atol=1e-6)


def test_mixup_runs_after_normalisation_on_the_device(digits):
    cfg = _digits_cfg(digits, steps_per_epoch=2, mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0,
                                                         "label_smoothing": 0.1})
    loader = make_train_loader(cfg, 0, 1, 8, device="cpu")
    loader.set_epoch(3)
    raw = list(loader.raw())
    assert all(x.dtype == torch.uint8 for x, _ in raw) and all(y.dtype == torch.int64 for _, y in raw)
    loader.set_epoch(3)
    np.random.seed(0)
    got = list(loader)
    np.random.seed(0)  # timm's Mixup draws lambda and the mode from numpy
    mix = build_mixup(cfg, 10)
    for (x8, y), (x, soft) in zip(raw, got):
        want_x, want_y = mix(_by_hand(x8, timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD).float(), y)
        assert soft.shape == (8, 10) and torch.allclose(soft, want_y)
        assert torch.allclose(x, want_x, atol=1e-5)


def test_resolve_data_takes_the_in21k_weights_own_normalisation_and_crop():
    model = timm.create_model("test_vit", pretrained=False, num_classes=10)
    model.pretrained_cfg = timm.models.get_pretrained_cfg(IN21K).to_dict()  # an in21k-style pretrained_cfg
    got = resolve_data(DataConfig(recipe="fgvc", image_size=224), model)
    assert got.mean == (0.5, 0.5, 0.5) and got.std == (0.5, 0.5, 0.5)  # REFERENCE.md: not ImageNet's
    assert got.crop_pct == 0.9 and got.interpolation == "bicubic"
    resize = build_eval_transform(got).transforms[0]
    assert resize.size == 248  # floor(224 / 0.9), not 256 = 224 / 0.875
    # the config's own values win, key by key
    mine = resolve_data(DataConfig(recipe="fgvc", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), crop_pct=0.8,
                                   interpolation="bilinear"), model)
    assert (mine.mean, mine.std, mine.crop_pct, mine.interpolation) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 0.8,
                                                                        "bilinear")
    partial = resolve_data(DataConfig(crop_pct=0.95), model)
    assert partial.crop_pct == 0.95 and partial.mean == (0.5, 0.5, 0.5)
    # no model: the defaults of before (ImageNet mean/std, crop 0.875, bicubic)
    plain = DataConfig(recipe="fgvc", image_size=224)
    assert resolve_data(plain, None) is plain
    assert build_eval_transform(plain).transforms[0].size == 256


def test_resolve_data_keeps_segment_anythings_normalisation():
    from segment_anything.modeling import Sam

    from gps_ds.models import create_model

    sam = create_model("sam_small", 1)
    got = resolve_data(DataConfig(recipe="segmentation", image_size=64), sam)
    defaults = inspect.signature(Sam.__init__).parameters  # segment-anything's own pixel_mean/std (0-255)
    want_mean = [v / 255.0 for v in defaults["pixel_mean"].default]
    want_std = [v / 255.0 for v in defaults["pixel_std"].default]
    assert got.mean == pytest.approx(want_mean) and got.std == pytest.approx(want_std)


def test_workers_prefetch_and_pin_memory_keys(digits, monkeypatch):
    for key, bad in (("data.prefetch", "0"), ("data.workers", "-1"), ("data.pin_memory", "sometimes")):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}={bad}"])
        assert key in str(err.value) and "\n" not in str(err.value)
    seen = {}
    real = torch.utils.data.DataLoader

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", spy)
    loader = make_eval_loader(_digits_cfg(digits).model_copy(update={"workers": 1, "prefetch": 3}), 0, 1, 256)
    assert sum(b.valid.sum().item() for b in loader) == 450
    assert seen["num_workers"] == 1 and seen["prefetch_factor"] == 3 and seen["pin_memory"] is False
    # pinning: only for a CUDA device (a no-op elsewhere); auto and true pin there, false never
    for setting, on_cuda in (("auto", True), (True, True), (False, False)):
        cfg = DataConfig(pin_memory=setting)
        assert loaders_mod._pin(cfg, "cpu") is False and loaders_mod._pin(cfg, None) is False
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert loaders_mod._pin(cfg, "cuda:0") is on_cuda
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert loaders_mod._pin(cfg, "cuda:0") is False
