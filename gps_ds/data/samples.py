"""From raw webdataset samples to model inputs: decode + transform one sample, collate
a batch, and find out which DataLoader worker this is."""

from __future__ import annotations

import io
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .decode import decode_label, decode_sample, image_bytes

class MaskWithOriginal(NamedTuple):
    """One segmentation evaluation target: the transformed mask and the stored mask."""

    mask: torch.Tensor       # [1, S, S] float {0, 1}, resized and padded like the image
    original: torch.Tensor   # [H, W] bool at the image's original resolution


class SegTargets(NamedTuple):
    """``EvalBatch.targets`` of segmentation: ``masks, originals = batch.targets``."""

    masks: torch.Tensor              # [B, 1, S, S] float {0, 1}
    originals: list[torch.Tensor]    # B bool masks [H_i, W_i] (foreground = stored pixel > 127)


Target = Union[int, torch.Tensor, MaskWithOriginal]


def original_mask(mask: Image.Image) -> torch.Tensor:
    """The stored mask (``L``) as a bool ``[H, W]`` tensor, foreground where ``> 127``."""
    return torch.from_numpy(np.asarray(mask) > 127)


class SampleProcessor:
    """``raw sample -> (inputs, target)``. ``transform`` takes the image (classification)
    or ``(image, mask)`` (segmentation). With ``originals=True`` (segmentation evaluation)
    the target is a :class:`MaskWithOriginal`. Raises on missing members or bad bytes."""

    def __init__(self, transform: Callable, segmentation: bool = False, originals: bool = False,
                 num_classes: Optional[int] = None) -> None:
        if originals and not segmentation:
            raise ValueError("originals=True needs segmentation=True")
        self.num_classes = num_classes  # labels outside [0, num_classes) are refused (skipped, counted)
        self.transform = transform
        self.segmentation = segmentation
        self.originals = originals
        self.lazy = bool(getattr(transform, "accepts_lazy", False)) and not segmentation

    def decode(self, sample: dict[str, Any]) -> tuple[Image.Image, Any]:
        if self.lazy:  # the transform decodes (possibly at reduced scale)
            return Image.open(io.BytesIO(image_bytes(sample))), decode_label(sample, self.num_classes)
        return decode_sample(sample, self.segmentation, self.num_classes)

    def apply(self, img: Image.Image, target: Any) -> tuple[Any, Target]:
        if self.segmentation:
            x, m = self.transform(img, target)
            return (x, MaskWithOriginal(m, original_mask(target))) if self.originals else (x, m)
        return self.transform(img), target

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, Target]:
        return self.apply(*self.decode(sample))


def stack(values: Sequence[Any]) -> Any:
    """Stack tensors (or tuples of tensors, e.g. two views) along a new batch dim."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if first.ndim == 3 and all(v.permute(1, 2, 0).is_contiguous() for v in values):
            # HWC memory seen as CHW (PIL -> tensor): copy whole images, keep a channels-last batch
            return torch.stack([v.permute(1, 2, 0) for v in values]).permute(0, 3, 1, 2)
        return torch.stack(list(values))
    if isinstance(first, (tuple, list)):
        return tuple(stack([v[i] for v in values]) for i in range(len(first)))
    return torch.as_tensor(values)


def collate(pairs: Sequence[tuple[Any, Target]]) -> tuple[Any, Any]:
    """``[(x, y), ...] -> (X, Y)``; integer labels become an int64 tensor, masks with
    originals a :class:`SegTargets`."""
    xs, ys = zip(*pairs)
    if isinstance(ys[0], MaskWithOriginal):
        return stack(xs), SegTargets(torch.stack([y.mask for y in ys]), [y.original for y in ys])
    if isinstance(ys[0], torch.Tensor):
        return stack(xs), torch.stack(list(ys))
    return stack(xs), torch.tensor(ys, dtype=torch.int64)


def worker_info() -> tuple[int, int]:
    """``(worker id, number of workers)`` of the current DataLoader worker (``(0, 1)`` in
    the main process)."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across runs and processes)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
