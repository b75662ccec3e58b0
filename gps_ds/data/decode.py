"""Turn a webdataset sample (``{"__key__": ..., "jpg": bytes, "cls": bytes, ...}``) into
a PIL image and a target. Grayscale (MNIST, digits) and CMYK images come out RGB."""

from __future__ import annotations

import io
from typing import Any, Optional, Union

from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
MASK_EXT = "mask.png"
LABEL_EXT = "cls"


def image_bytes(sample: dict[str, Any]) -> bytes:
    """The encoded image of a sample; ``KeyError`` when it has none."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"sample {sample.get('__key__')!r} has no image ({'/'.join(IMAGE_EXTS)}); "
                   f"keys: {sorted(k for k in sample if not k.startswith('__'))}")


def open_image(data: bytes, mode: str = "RGB") -> Image.Image:
    """Decode fully (so a truncated file fails here, not later) and convert to ``mode``."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == mode else img.convert(mode)


class LabelError(ValueError):
    """A sample's label is not an integer in ``[0, num_classes)``."""


def decode_label(sample: dict[str, Any], num_classes: Optional[int] = None) -> int:
    if LABEL_EXT not in sample:
        raise KeyError(f"sample {sample.get('__key__')!r} has no .{LABEL_EXT} label")
    raw = sample[LABEL_EXT]
    try:
        label = int(raw)
    except (TypeError, ValueError):
        raise LabelError(f"sample {sample.get('__key__')!r}: label {bytes(raw)[:20]!r} is not an integer") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise LabelError(f"sample {sample.get('__key__')!r}: label {label} is outside [0, {num_classes})")
    return label


def decode_mask(sample: dict[str, Any]) -> Image.Image:
    """The segmentation mask as an ``L`` image (0 = background, > 127 = object)."""
    if MASK_EXT not in sample:
        raise KeyError(f"sample {sample.get('__key__')!r} has no .{MASK_EXT}")
    return open_image(sample[MASK_EXT], "L")


def decode_sample(sample: dict[str, Any], segmentation: bool = False,
                  num_classes: Optional[int] = None) -> tuple[Image.Image, Union[int, Image.Image]]:
    """``(RGB image, label)`` or, for segmentation, ``(RGB image, mask)``.

    Raises ``KeyError`` for a missing member, :class:`LabelError` for a label that is not an
    integer in ``[0, num_classes)`` and ``OSError`` for undecodable bytes."""
    target = decode_mask(sample) if segmentation else decode_label(sample, num_classes)
    return open_image(image_bytes(sample)), target
