"""ImageNet-1k class order and the 200-class subsets of ImageNet-A and ImageNet-R.

The wnid lists ship with timm (`timm/data/_info/imagenet_synsets.txt`, `imagenet_a_synsets.txt`,
`imagenet_r_synsets.txt`; the same lists as the datasets' official releases, Hendrycks et al.), so
no download is needed; a file of wnids (one a line) can replace any of them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SUBSETS = ("imagenet-a", "imagenet-r")
_TIMM_FILES = {"imagenet-1k": "imagenet_synsets.txt", "imagenet-a": "imagenet_a_synsets.txt",
               "imagenet-r": "imagenet_r_synsets.txt"}
_WNID = re.compile(r"^n\d{8}$")


def read_wnids(path: str | os.PathLike) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"wnid list not found: {p}")
    wnids = [line.split()[0] for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
    bad = next((w for w in wnids if not _WNID.match(w)), None)
    if bad is not None:
        raise ValueError(f"{p}: {bad!r} is not a WordNet id (nXXXXXXXX)")
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{p}: a wnid is listed twice")
    return wnids


def timm_list(which: str) -> list[str]:
    import timm.data

    return read_wnids(Path(timm.data.__file__).parent / "_info" / _TIMM_FILES[which])


def imagenet_classes(path: str | os.PathLike | None = None) -> list[str]:
    """The 1000 ImageNet-1k wnids in class-index order."""
    wnids = read_wnids(path) if path is not None else timm_list("imagenet-1k")
    if len(wnids) != 1000:
        raise ValueError(f"the ImageNet-1k class list must hold 1000 wnids, {path} holds {len(wnids)}")
    return wnids


def subset_wnids(which: str, path: str | os.PathLike | None = None) -> list[str]:
    if which not in SUBSETS:
        raise ValueError(f"unknown subset {which!r} (expected one of {', '.join(SUBSETS)})")
    return read_wnids(path) if path is not None else timm_list(which)


def subset_indices(wnids: list[str], classes: list[str]) -> list[int]:
    """ImageNet-1k indices of the subset's wnids (sorted, as the logits are restricted)."""
    index = {w: i for i, w in enumerate(classes)}
    missing = next((w for w in wnids if w not in index), None)
    if missing is not None:
        raise ValueError(f"wnid {missing} of the subset is not an ImageNet-1k class")
    return sorted(index[w] for w in wnids)
