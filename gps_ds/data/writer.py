"""Shard-writing engine: items in, ``<split>-NNNNNN.tar`` shards plus ``_info.json`` out.

Deterministic (the same items, options and seed give byte-identical shards, whatever
the number of workers), parallel (one task per shard), atomic (everything is written
to a hidden temporary folder that is renamed into place at the end) and refuses to
replace an existing folder unless ``overwrite=True``.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from .fewshot import select_few_shot
from .tario import write_tar

FORMAT = "gps-ds-shards/1"
INFO_NAME = "_info.json"
JPEG_QUALITY = 95
_MAX_LISTED_SKIPS = 100


@dataclass(frozen=True)
class Item:
    """One sample to write. ``image`` is a file path or a uint8 array (HxW or HxWx3)."""

    key: str
    image: Union[str, np.ndarray]
    label: Optional[int] = None
    mask: Optional[str] = None
    extra: tuple[tuple[str, bytes], ...] = ()


@dataclass
class WriteOptions:
    """How shards are written (shared by every dataset writer)."""

    shard_size: int = 1000          # max samples per shard
    workers: int = 1                # parallel processes (one shard per task)
    overwrite: bool = False
    seed: int = 0                   # sample order (shuffle) and few-shot choice
    shuffle: bool = True            # shuffle each split before sharding (sequential reads mix classes)
    few_shot: Optional[int] = None  # keep k samples per class of the few_shot_splits
    few_shot_splits: tuple[str, ...] = ("train",)
    lossless: bool = False          # re-encode as PNG instead of JPEG
    verify: bool = True             # fully decode every source image (skip the undecodable)
    progress: bool = True
    extra_info: dict[str, Any] = field(default_factory=dict)


def _encode_pil(img: Image.Image, lossless: bool) -> tuple[str, bytes]:
    if img.mode not in ("RGB", "L"):
        img = img.convert("L" if img.mode in ("1", "LA", "I", "I;16", "F") else "RGB")
    buf = io.BytesIO()
    if lossless:
        img.save(buf, format="PNG", compress_level=6)
        return "png", buf.getvalue()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "jpg", buf.getvalue()


def encode_image(src: Union[str, np.ndarray], lossless: bool = False, verify: bool = True) -> tuple[str, bytes, tuple[int, int]]:
    """``(ext, bytes, (width, height))``. JPEG (or, lossless, PNG) files in RGB or L are
    copied byte for byte; anything else is decoded and re-encoded."""
    if isinstance(src, np.ndarray):
        img = Image.fromarray(np.ascontiguousarray(src, dtype=np.uint8))
        return (*_encode_pil(img, lossless), img.size)
    with open(src, "rb") as f:
        data = f.read()
    img = Image.open(io.BytesIO(data))
    keep = "PNG" if lossless else "JPEG"
    if img.format == keep and img.mode in ("RGB", "L"):
        if verify:
            img.load()
        return ("png" if lossless else "jpg"), data, img.size
    img.load()
    return (*_encode_pil(img, lossless), img.size)


def encode_mask(path: str) -> tuple[bytes, tuple[int, int]]:
    """A binary mask as PNG (0 background, 255 object; source pixels > 127 are object)."""
    img = Image.open(path)
    img.load()
    binary = img.convert("L").point(lambda v: 255 if v > 127 else 0)
    buf = io.BytesIO()
    binary.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), binary.size


def encode_item(item: Item, lossless: bool = False, verify: bool = True) -> dict[str, bytes]:
    """The files of one sample: image, ``cls``, ``mask.png``, extras (written ordered by extension)."""
    ext, data, size = encode_image(item.image, lossless, verify)
    files = {ext: data}
    if item.label is not None:
        files["cls"] = str(int(item.label)).encode("ascii")
    if item.mask is not None:
        mask, mask_size = encode_mask(item.mask)
        if mask_size != size:
            raise ValueError(f"mask size {mask_size} differs from image size {size}")
        files["mask.png"] = mask
    for name, blob in item.extra:
        files[name] = blob
    return files


def _write_shard(path: str, items: Sequence[Item], lossless: bool, verify: bool) -> dict[str, Any]:
    skipped: list[list[str]] = []

    def samples():
        for item in items:
            try:
                files = encode_item(item, lossless, verify)
            except Exception as exn:  # noqa: BLE001 - an unreadable source file is skipped, not fatal
                skipped.append([item.key, f"{type(exn).__name__}: {exn}"])
                continue
            yield item.key, files

    n = write_tar(path, samples())
    return {"name": os.path.basename(path), "samples": n, "bytes": os.path.getsize(path), "skipped": skipped}


def _order(split: str, items: list[Item], opts: WriteOptions) -> list[Item]:
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"split {split!r}: duplicate sample keys")
    if opts.few_shot is not None and split in opts.few_shot_splits:
        if any(it.label is None for it in items):
            raise ValueError("few_shot needs labelled items")
        keep = set(select_few_shot(((it.key, int(it.label)) for it in items), opts.few_shot, opts.seed))
        items = [it for it in items if it.key in keep]
    items = sorted(items, key=lambda it: it.key)
    if opts.shuffle:
        random.Random(f"{opts.seed}:{split}").shuffle(items)
    return items


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def write_dataset(out: Union[str, os.PathLike], splits: dict[str, list[Item]], *, kind: str,
                  classes: Optional[list[str]] = None, options: Optional[WriteOptions] = None) -> dict[str, Any]:
    """Write every split of ``splits`` into ``out`` and return the ``_info.json`` content."""
    opts = options or WriteOptions()
    if opts.shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    out = Path(out)
    _check_target(out, opts.overwrite)
    if opts.few_shot is not None and not set(opts.few_shot_splits) & set(splits):
        raise ValueError(f"few_shot applies to split(s) {list(opts.few_shot_splits)}, not written here")
    ordered = {name: _order(name, items, opts) for name, items in splits.items()}
    for name, items in ordered.items():
        if not items:
            raise ValueError(f"split {name!r} has no samples")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tasks = []
    for name, items in ordered.items():
        for i in range(0, len(items), opts.shard_size):
            tasks.append((name, str(tmp / f"{name}-{i // opts.shard_size:06d}.tar"), items[i:i + opts.shard_size]))
    results: dict[str, dict[str, Any]] = {}
    try:
        bar = tqdm(total=sum(len(t[2]) for t in tasks), desc=f"shards {out.name}", unit="img",
                   disable=not opts.progress, dynamic_ncols=True)
        with bar:
            if opts.workers <= 1:
                for _, path, items in tasks:
                    results[path] = _write_shard(path, items, opts.lossless, opts.verify)
                    bar.update(len(items))
            else:
                with cf.ProcessPoolExecutor(max_workers=opts.workers) as pool:
                    futures = {pool.submit(_write_shard, path, items, opts.lossless, opts.verify): (path, len(items))
                               for _, path, items in tasks}
                    for fut in cf.as_completed(futures):
                        path, n = futures[fut]
                        results[path] = fut.result()
                        bar.update(n)
        info = _make_info(kind, classes, ordered, tasks, results, opts)
        for name, split in info["splits"].items():
            if split["skipped"]:
                first = split["skipped_keys"][0]
                warnings.warn(f"{out}: split {name!r}: skipped {split['skipped']} unreadable source file(s), "
                              f"e.g. {first[0]} ({first[1]}); listed in {INFO_NAME}", RuntimeWarning, stacklevel=2)
        with open(tmp / INFO_NAME, "w") as f:
            f.write(json.dumps(info, sort_keys=True, indent=1) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _make_info(kind: str, classes: Optional[list[str]], ordered: dict[str, list[Item]], tasks: list,
               results: dict[str, dict[str, Any]], opts: WriteOptions) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    for name in ordered:
        shards = [results[path] for split, path, _ in tasks if split == name]
        skipped = [s for r in shards for s in r["skipped"]]
        splits[name] = {
            "size": sum(r["samples"] for r in shards),
            "shards": [{"name": r["name"], "samples": r["samples"], "bytes": r["bytes"]} for r in shards],
            "skipped": len(skipped),
            "skipped_keys": skipped[:_MAX_LISTED_SKIPS],
        }
    info: dict[str, Any] = {
        "format": FORMAT,
        "kind": kind,
        "classes": classes,
        "num_classes": len(classes) if classes else None,
        "shard_size": opts.shard_size,
        "seed": opts.seed,
        "shuffled": opts.shuffle,
        "few_shot": opts.few_shot,
        "splits": splits,
    }
    info.update(opts.extra_info)
    return info
