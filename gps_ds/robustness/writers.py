"""Shard writers for the robustness sets, labels as ImageNet-1k class indices.

* ImageNet-A / ImageNet-R: `root/<wnid>/<image>` (200 class folders, as released); one split,
  `test`. `_info.json` lists the 1000 ImageNet-1k classes and the subset (`subset_wnids`,
  `subset_indices`) that evaluation restricts the logits to.
* ImageNet-C: `root/<corruption>/<severity>/<wnid>/<image>` (as released); one split per
  corruption and severity, named `<corruption>-<severity>` (e.g. `fog-3`); `_info.json` lists
  the corruptions and severities written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from gps_ds.data.datasets import list_images, make_key
from gps_ds.data.writer import Item, WriteOptions, write_dataset
from gps_ds.robustness.classes import imagenet_classes, subset_indices, subset_wnids
from gps_ds.robustness.metrics import CORRUPTIONS, SEVERITIES

PathLike = str | os.PathLike


def _class_items(folder: Path, index: dict[str, int], allowed: set[str] | None, what: str) -> list[Item]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: folder {folder} does not exist")
    items: list[Item] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in index:
            raise ValueError(f"{what}: folder {sub} is not an ImageNet-1k wnid")
        if allowed is not None and sub.name not in allowed:
            raise ValueError(f"{what}: folder {sub} is not one of the subset's 200 classes")
        for rel in list_images(sub):
            items.append(Item(make_key(len(items), f"{sub.name}_{rel}"), str(sub / rel), index[sub.name]))
    if not items:
        raise ValueError(f"{what}: no images under {folder}/<wnid>/")
    return items


def _options(options: dict[str, Any], extra: dict[str, Any]) -> WriteOptions:
    return WriteOptions(**{**options, "extra_info": {**options.get("extra_info", {}), **extra}})


def write_subset(which: str, root: PathLike, out: PathLike, wnids: PathLike | None = None,
                 classes: PathLike | None = None, **options: Any) -> dict[str, Any]:
    """ImageNet-A (`which="imagenet-a"`) or ImageNet-R (`"imagenet-r"`) as split `test`."""
    names = imagenet_classes(classes)
    subset = subset_wnids(which, wnids)
    index = {w: i for i, w in enumerate(names)}
    items = _class_items(Path(root), index, set(subset), which)
    extra = {"robustness": which, "subset_wnids": subset, "subset_indices": subset_indices(subset, names)}
    return write_dataset(out, {"test": items}, kind=which, classes=names, options=_options(options, extra))


def write_imagenet_c(root: PathLike, out: PathLike, corruptions: Sequence[str] | None = None,
                     severities: Sequence[int] = SEVERITIES, classes: PathLike | None = None,
                     **options: Any) -> dict[str, Any]:
    """ImageNet-C: one split `<corruption>-<severity>` per folder `root/<corruption>/<severity>/`."""
    names = imagenet_classes(classes)
    index = {w: i for i, w in enumerate(names)}
    root = Path(root)
    chosen = list(corruptions or CORRUPTIONS)
    unknown = next((c for c in chosen if c not in CORRUPTIONS), None)
    if unknown is not None:
        raise ValueError(f"unknown corruption {unknown!r} (expected some of: {', '.join(CORRUPTIONS)})")
    bad = next((s for s in severities if s not in SEVERITIES), None)
    if bad is not None:
        raise ValueError(f"severity {bad} is not one of 1-5")
    splits = {f"{c}-{s}": _class_items(root / c / str(s), index, None, "imagenet-c") for c in chosen for s in severities}
    extra = {"robustness": "imagenet-c", "corruptions": chosen, "severities": list(severities)}
    return write_dataset(out, splits, kind="imagenet-c", classes=names, options=_options(options, extra))
