"""Turn a webdataset sample (``{"__key__": ..., "jpg": bytes, "cls": bytes, ...}``) into
a PIL image and a target. Grayscale (MNIST, digits) and CMYK images come out RGB."""

from __future__ import annotations

import io
from typing import Any, Union

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


def decode_label(sample: dict[str, Any]) -> int:
    if LABEL_EXT not in sample:
        raise KeyError(f"sample {sample.get('__key__')!r} has no .{LABEL_EXT} label")
    return int(sample[LABEL_EXT])


def decode_mask(sample: dict[str, Any]) -> Image.Image:
    """The segmentation mask as an ``L`` image (0 = background, > 127 = object)."""
    if MASK_EXT not in sample:
        raise KeyError(f"sample {sample.get('__key__')!r} has no .{MASK_EXT}")
    return open_image(sample[MASK_EXT], "L")


def decode_sample(sample: dict[str, Any], segmentation: bool = False) -> tuple[Image.Image, Union[int, Image.Image]]:
    """``(RGB image, label)`` or, for segmentation, ``(RGB image, mask)``.

    Raises ``KeyError`` for a missing member and ``OSError`` for undecodable bytes."""
    target = decode_mask(sample) if segmentation else decode_label(sample)
    return open_image(image_bytes(sample)), target
