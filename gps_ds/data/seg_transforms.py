"""Joint image + mask transform for SAM-style segmentation.

Longest side resized to ``size`` (SAM's ``ResizeLongestSide`` rule), random flips drawn
once and applied to image and mask alike, image normalised, both padded at the bottom
and right to ``size x size`` (as ``Sam.preprocess`` pads: zeros after normalisation).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def longest_side_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """``(new_width, new_height)`` with the longest side equal to ``size``."""
    scale = size / max(width, height)
    return int(width * scale + 0.5), int(height * scale + 0.5)


class JointTransform:
    """``(RGB image, L mask) -> (float image [3, S, S], float mask [1, S, S] in {0, 1})``."""

    def __init__(self, size: int = 1024, hflip: float = 0.0, vflip: float = 0.0, train: bool = True,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        self.size = size
        self.hflip = hflip if train else 0.0
        self.vflip = vflip if train else 0.0
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, img: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        if img.size != mask.size:
            raise ValueError(f"image size {img.size} and mask size {mask.size} differ")
        w, h = longest_side_shape(*img.size, self.size)
        img = img.resize((w, h), Image.BILINEAR)
        mask = mask.resize((w, h), Image.NEAREST)
        if self.hflip and torch.rand(()) < self.hflip:
            img, mask = TF.hflip(img), TF.hflip(mask)
        if self.vflip and torch.rand(()) < self.vflip:
            img, mask = TF.vflip(img), TF.vflip(mask)
        x = TF.normalize(TF.to_tensor(img), self.mean, self.std)
        m = (TF.pil_to_tensor(mask) > 127).float()
        pad = [0, 0, self.size - w, self.size - h]  # left, top, right, bottom
        return TF.pad(x, pad, fill=0.0), TF.pad(m, pad, fill=0.0)

    def __repr__(self) -> str:
        return f"JointTransform(size={self.size}, hflip={self.hflip}, vflip={self.vflip})"


def valid_region(original_sizes: Sequence[Union[tuple[int, int], torch.Tensor]], size: int,
                 device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """bool ``[B, 1, size, size]``: True on the unpadded pixels of each padded input.
    ``original_sizes``: ``(height, width)`` pairs, or the original masks themselves
    (``EvalBatch.targets.originals``)."""
    region = torch.zeros(len(original_sizes), 1, size, size, dtype=torch.bool, device=device)
    for i, item in enumerate(original_sizes):
        height, width = item.shape[-2:] if isinstance(item, torch.Tensor) else item
        w, h = longest_side_shape(int(width), int(height), size)
        region[i, 0, :h, :w] = True
    return region
