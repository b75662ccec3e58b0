"""From raw webdataset samples to model inputs: decode + transform one sample, collate
a batch, and find out which DataLoader worker this is."""

from __future__ import annotations

import io
from typing import Any, Callable, Sequence, Union

import torch
from PIL import Image

from .decode import decode_label, decode_sample, image_bytes

Target = Union[int, torch.Tensor]


class SampleProcessor:
    """``raw sample -> (inputs, target)``. ``transform`` takes the image (classification)
    or ``(image, mask)`` (segmentation). Raises on missing members or bad bytes."""

    def __init__(self, transform: Callable, segmentation: bool = False) -> None:
        self.transform = transform
        self.segmentation = segmentation
        self.lazy = bool(getattr(transform, "accepts_lazy", False)) and not segmentation

    def decode(self, sample: dict[str, Any]) -> tuple[Image.Image, Any]:
        if self.lazy:  # the transform decodes (possibly at reduced scale)
            return Image.open(io.BytesIO(image_bytes(sample))), decode_label(sample)
        return decode_sample(sample, self.segmentation)

    def apply(self, img: Image.Image, target: Any) -> tuple[Any, Target]:
        if self.segmentation:
            return self.transform(img, target)
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


def collate(pairs: Sequence[tuple[Any, Target]]) -> tuple[Any, torch.Tensor]:
    """``[(x, y), ...] -> (X, Y)``; integer labels become an int64 tensor."""
    xs, ys = zip(*pairs)
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
