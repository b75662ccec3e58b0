"""The paper's image transforms (through timm where it has them), the SupCon two-view
augmentation for GPS scoring, and mixup/cutmix/label smoothing from the config.

Recipes (REFERENCE.md):

* ``fgvc`` / ``imagenet`` — train: RandomResizedCrop + horizontal flip; eval: resize to
  ``image_size / crop_pct`` + center crop.
* ``vtab`` / ``digits`` — resize to ``image_size`` x ``image_size``, no augmentation.
* ``segmentation`` — see :mod:`gps_ds.data.seg_transforms`.

Normalisation (mean/std), ``crop_pct`` and interpolation are the model's own (its timm
``pretrained_cfg``, see :func:`resolve_data`) unless the config sets them; without a model,
timm's defaults (ImageNet mean/std, crop 0.875, bicubic).

Images reach these transforms as RGB PIL images (grayscale inputs are converted on decode).
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from .config import DataConfig
from .seg_transforms import JointTransform

ImageTransform = Callable[[Image.Image], torch.Tensor]

#: SupCon's augmentation (Khosla et al.; used by GPS for scoring).
TWO_VIEW_SCALE = (0.2, 1.0)
TWO_VIEW_JITTER = (0.4, 0.4, 0.4, 0.1)


#: the data-config keys a model's pretrained_cfg supplies when the config leaves them unset
MODEL_DATA_KEYS = ("mean", "std", "crop_pct", "interpolation")
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _norm(cfg: DataConfig) -> dict:
    return {"mean": tuple(cfg.mean or IMAGENET_DEFAULT_MEAN), "std": tuple(cfg.std or IMAGENET_DEFAULT_STD)}


def _interp(cfg: DataConfig) -> str:
    return cfg.interpolation or "bicubic"


def resolve_data(cfg: DataConfig, model: Optional[torch.nn.Module]) -> DataConfig:
    """``cfg`` with mean, std, crop_pct and interpolation filled in: the config's own values win,
    the rest come from the model through ``timm.data.resolve_data_config`` (its
    ``pretrained_cfg``: 0.5/0.5 and crop 0.9 for the in21k AugReg ViTs). A SAM model (no
    pretrained_cfg, ``pixel_mean``/``pixel_std`` buffers in 0-255) gives segment-anything's
    normalisation. Every loader of a run should read the returned config."""
    if model is None:
        return cfg
    from timm.data import resolve_data_config

    given = {k: getattr(cfg, k) for k in MODEL_DATA_KEYS if getattr(cfg, k) is not None}
    resolved = resolve_data_config(args=dict(given), model=model)
    if getattr(model, "pretrained_cfg", None) is None and hasattr(model, "pixel_mean") and hasattr(model, "pixel_std"):
        resolved["mean"] = tuple(float(v) / 255.0 for v in model.pixel_mean.flatten().tolist())
        resolved["std"] = tuple(float(v) / 255.0 for v in model.pixel_std.flatten().tolist())
    interp = resolved.get("interpolation")
    update = {"mean": tuple(float(v) for v in resolved["mean"]), "std": tuple(float(v) for v in resolved["std"]),
              "crop_pct": float(resolved.get("crop_pct") or DEFAULT_CROP_PCT),
              "interpolation": interp if interp in _INTERPOLATIONS else "bicubic"}
    update.update(given)  # resolve_data_config already prefers them; kept exact (no float round trip)
    return cfg.model_copy(update=update)


def _squash(cfg: DataConfig, uint8: bool) -> ImageTransform:
    # Resize((s, s)) + ToTensor + Normalize — the VTAB-1k recipe
    return create_transform(cfg.size, is_training=False, crop_pct=1.0, crop_mode="squash",
                            interpolation=_interp(cfg), use_prefetcher=uint8, **_norm(cfg))


def build_train_transform(cfg: DataConfig, uint8: bool = False) -> Callable:
    """The recipe's training transform. For ``segmentation`` a :class:`JointTransform`
    taking ``(image, mask)``; otherwise a transform of one image.

    ``uint8=True`` (what the loaders use) stops before ToTensor-to-float and
    normalisation, leaving a uint8 CHW tensor; :class:`BatchNormalize` finishes the job on
    whole batches (timm's "prefetcher" split). With ``cfg.fast_crop`` the fgvc/imagenet
    crop is then :class:`FastRandomResizedCrop`. Segmentation always returns float."""
    if cfg.recipe == "segmentation":
        return JointTransform(cfg.size, hflip=cfg.hflip, vflip=cfg.vflip, train=True, **_norm(cfg))
    if cfg.recipe in ("vtab", "digits"):
        return _squash(cfg, uint8)
    if uint8 and cfg.fast_crop:
        return FastRandomResizedCrop(cfg.size, scale=(0.08, 1.0), interpolation=_interp(cfg), hflip=cfg.hflip)
    return create_transform(cfg.size, is_training=True, scale=(0.08, 1.0), hflip=cfg.hflip,
                            color_jitter=None, auto_augment=None, interpolation=_interp(cfg),
                            use_prefetcher=uint8, **_norm(cfg))


def build_eval_transform(cfg: DataConfig, uint8: bool = False) -> Callable:
    """The recipe's evaluation transform (deterministic); ``uint8`` as in :func:`build_train_transform`."""
    if cfg.recipe == "segmentation":
        return JointTransform(cfg.size, train=False, **_norm(cfg))
    if cfg.recipe in ("vtab", "digits"):
        return _squash(cfg, uint8)
    return create_transform(cfg.size, is_training=False, crop_pct=cfg.crop_pct or DEFAULT_CROP_PCT,
                            interpolation=_interp(cfg), use_prefetcher=uint8, **_norm(cfg))


class BatchNormalize:
    """``uint8 [B, 3, H, W] -> float``, ``(x - 255 mean) / (255 std)``, optionally on ``device``.
    Anything that is not a uint8 tensor (already normalised) passes through; tuples (two
    views) are handled element-wise."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: Optional[torch.device] = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.mean = torch.tensor([255.0 * m for m in mean]).view(1, -1, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std]).view(1, -1, 1, 1)

    def __call__(self, x: Any) -> Any:
        if isinstance(x, (tuple, list)):
            return type(x)(self(v) for v in x)
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8):
            return x
        if self.device is not None:
            x = x.to(self.device, non_blocking=True)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return x.to(torch.float32, memory_format=torch.contiguous_format).sub_(mean).div_(std)


def build_batch_normalize(cfg: DataConfig, device: Optional[torch.device] = None) -> BatchNormalize:
    n = _norm(cfg)
    return BatchNormalize(n["mean"], n["std"], device)


class FastRandomResizedCrop(RandomResizedCropAndInterpolation):
    """timm's RandomResizedCrop + horizontal flip, ending in a uint8 CHW tensor, faster:

    * the crop is sampled exactly as timm samples it (``get_params``, Python ``random``);
    * a JPEG that is not decoded yet is decoded at 1/2, 1/4 or 1/8 scale (libjpeg DCT
      scaling) when the crop is at least that many times the output size;
    * the crop is resized by torch's uint8 antialiased interpolation, which reproduces
      PIL's resampling to within rounding at a fraction of its cost.
    """

    accepts_lazy = True

    def __init__(self, size: int, scale: tuple[float, float], interpolation: str, hflip: float) -> None:
        super().__init__(size, scale=scale, interpolation=interpolation)
        self.hflip = hflip

    def __call__(self, img: Image.Image) -> torch.Tensor:
        lazy = getattr(img, "format", None) == "JPEG" and bool(getattr(img, "tile", None))
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        interp = random.choice(self.interpolation) if isinstance(self.interpolation, (tuple, list)) else self.interpolation
        out_h, out_w = self.size
        scale = 1.0
        if lazy and min(w / out_w, h / out_h) >= 2:
            width, height = img.size
            factor = min(w / out_w, h / out_h)
            drafted = img.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
            if drafted is not None:
                scale = drafted[1][2] / width
        top, left = int(round(i * scale)), int(round(j * scale))
        box = (left, top, max(left + 1, int(round((j + w) * scale))), max(top + 1, int(round((i + h) * scale))))
        crop = torch.from_numpy(np.array(_rgb(img).crop(box))).permute(2, 0, 1)  # only the crop leaves PIL
        mode = _TORCH_MODES[interp]
        out = F.interpolate(crop[None], size=(out_h, out_w), mode=mode, antialias=mode != "nearest")[0]
        if self.hflip > 0 and torch.rand(1) < self.hflip:
            out = out.flip(-1)
        return out

    def __repr__(self) -> str:
        return f"FastRandomResizedCrop(size={self.size}, scale={self.scale}, hflip={self.hflip})"


_TORCH_MODES = {T.InterpolationMode.BILINEAR: "bilinear", T.InterpolationMode.BICUBIC: "bicubic",
                T.InterpolationMode.NEAREST: "nearest"}


def _rgb(img: Image.Image) -> Image.Image:
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


class TwoView:
    """Apply one random transform twice: ``image -> (view1, view2)``."""

    def __init__(self, transform: ImageTransform) -> None:
        self.transform = transform

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(img), self.transform(img)

    def __repr__(self) -> str:
        return f"TwoView({self.transform!r})"


def build_two_view_transform(cfg: DataConfig, uint8: bool = False) -> TwoView:
    """SupCon views: RandomResizedCrop(scale 0.2-1) + flip + colour jitter (p=0.8) +
    grayscale (p=0.2), then the recipe's normalisation (``uint8``: left to :class:`BatchNormalize`)."""
    view = create_transform(cfg.size, is_training=True, scale=TWO_VIEW_SCALE, hflip=0.5,
                            color_jitter=TWO_VIEW_JITTER, color_jitter_prob=0.8, grayscale_prob=0.2,
                            auto_augment=None, interpolation=_interp(cfg), use_prefetcher=uint8, **_norm(cfg))
    return TwoView(view)


def build_mixup(cfg: DataConfig, num_classes: int) -> Optional[Mixup]:
    """timm ``Mixup`` (mixup/cutmix, with label smoothing folded into the soft targets)
    from ``cfg.mixup``; ``None`` when no mixing is configured (labels stay class indices)."""
    m = cfg.mixup
    if not m.mixing:
        return None
    return Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, cutmix_minmax=m.cutmix_minmax,
                 prob=m.prob, switch_prob=m.switch_prob, mode=m.mode,
                 label_smoothing=m.label_smoothing, num_classes=num_classes)


def build_train_criterion(cfg: DataConfig) -> torch.nn.Module:
    """The loss that matches the training loader's targets: soft-target cross-entropy
    with mixing, label-smoothing cross-entropy with smoothing only, else cross-entropy."""
    if cfg.mixup.mixing:
        return SoftTargetCrossEntropy()
    if cfg.mixup.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.mixup.label_smoothing)
    return torch.nn.CrossEntropyLoss()
