"""Synthetic datasets on disk, for tests and for benchmarking without real data:
class folders of JPEGs, a Kvasir-SEG-like folder, and shards of chosen sizes."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from .tario import write_tar

PathLike = Union[str, os.PathLike]


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random colour field with some noise (compresses like a photo, not like noise)."""
    base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 8, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_imagefolder(root: PathLike, classes: int = 3, per_class: Union[int, Sequence[int]] = 4,
                     size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """``root/class{c}/img{i}.jpg`` with random JPEGs; ``per_class`` may differ per class."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    counts = [per_class] * classes if isinstance(per_class, int) else list(per_class)
    for c, n in enumerate(counts):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = size[0] + int(rng.integers(0, 9)), size[1] + int(rng.integers(0, 9))
            random_image(rng, w, h).save(root / f"class{c}" / f"img{c}_{i:04d}.jpg", quality=90)
    return root


def make_kvasir(root: PathLike, n: int = 10, size: tuple[int, int] = (64, 48), seed: int = 0,
                bbox: bool = True, sizes: Optional[Sequence[tuple[int, int]]] = None) -> Path:
    """A Kvasir-SEG-like folder: ``images/<id>.jpg``, ``masks/<id>.jpg`` (an ellipse, saved
    as JPEG so it has fuzzy edges like the real masks) and ``kavsir_bboxes.json``. Image
    ``i`` is ``sizes[i % len(sizes)]`` ``(width, height)`` when given, else ``size``."""
    import json

    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    boxes = {}
    for i in range(n):
        if sizes:
            size = tuple(sizes[i % len(sizes)])
        sid = f"cju{i:04d}x{int(rng.integers(0, 10**6)):06d}"
        random_image(rng, *size).save(root / "images" / f"{sid}.jpg", quality=90)
        x0, y0 = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))
        x1, y1 = x0 + size[0] // 3, y0 + size[1] // 3
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).ellipse((x0, y0, x1, y1), fill=255)
        mask.save(root / "masks" / f"{sid}.jpg", quality=90)
        boxes[sid] = {"height": size[1], "width": size[0],
                      "bbox": [{"label": "polyp", "xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1}]}
    if bbox:
        (root / "kavsir_bboxes.json").write_text(json.dumps(boxes))
    return root


def make_shards(folder: PathLike, sizes: Sequence[int], classes: int = 3, size: tuple[int, int] = (40, 32),
                seed: int = 0, prefix: str = "shard") -> list[str]:
    """Shards ``prefix-NNNNNN.tar`` holding ``sizes[i]`` labelled JPEG samples each, no
    ``_info.json``. Keys are ``s{shard}_{index}``, labels cycle through ``classes``."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, n in enumerate(sizes):
        samples = [(f"s{s}_{i:04d}", {"jpg": jpeg_bytes(random_image(rng, *size)),
                                       "cls": str((s * 7 + i) % classes).encode()}) for i in range(n)]
        path = folder / f"{prefix}-{s:06d}.tar"
        write_tar(str(path), samples)
        paths.append(str(path))
    return paths
