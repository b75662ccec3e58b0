"""Few-shot subsets: k samples per class, chosen by seed (the paper's Fig. 10 protocol).

The choice depends only on the set of (key, label) pairs, ``k`` and ``seed`` — not on
the order the samples arrive in — so the shard writer and the reader filter agree.
"""

from __future__ import annotations

import random
import tarfile
from collections import defaultdict
from typing import Callable, Iterable, Optional, Sequence

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from . import decode


def select_few_shot(samples: Iterable[tuple[str, int]], k: int, seed: int = 0) -> list[str]:
    """Keys of ``min(k, n_c)`` samples of every class ``c``, sorted.

    Each class draws from its own generator (seeded by ``seed`` and the label), so
    adding a class does not change the samples chosen for the others."""
    if k < 1:
        raise ValueError(f"few-shot k must be >= 1, got {k}")
    by_class: dict[int, list[str]] = defaultdict(list)
    for key, label in samples:
        by_class[int(label)].append(key)
    chosen: list[str] = []
    for label in sorted(by_class):
        keys = sorted(by_class[label])
        rng = random.Random(seed * 1_000_003 + label)
        chosen.extend(rng.sample(keys, min(k, len(keys))))
    return sorted(chosen)


def scan_labels(urls: Sequence[str], handler: Optional[Callable[[BaseException], bool]] = None) -> list[list[tuple[str, int]]]:
    """``(key, label)`` of every sample, one list per shard in shard order, reading only the
    ``.cls`` members (local shards are read by seeking past the images). A shard that
    cannot be read goes to ``handler`` (default: raise) and the scan goes on."""
    out: list[list[tuple[str, int]]] = []
    suffix = "." + decode.LABEL_EXT
    for url in urls:
        found: list[tuple[str, int]] = []
        try:
            if "://" not in url and not url.startswith("pipe:"):
                with tarfile.open(url, "r:") as tar:
                    for member in tar:
                        if member.isfile() and member.name.endswith(suffix):
                            key, _ = base_plus_ext(member.name)
                            found.append((key, int(tar.extractfile(member).read())))
            else:
                for sample in wds.tarfile_samples([{"url": url}], select_files=lambda n: n.endswith(suffix)):
                    found.append((sample["__key__"], int(sample[decode.LABEL_EXT])))
        except Exception as exn:  # noqa: BLE001 - the handler decides
            exn.args = tuple(exn.args) + (url,)
            if handler is None or not handler(exn):
                raise
        out.append(found)
    return out


def few_shot_selection(urls: Sequence[str], k: int, seed: int = 0,
                       handler: Optional[Callable[[BaseException], bool]] = None) -> list[list[str]]:
    """The few-shot keys found in each shard (one list per shard, in shard order)."""
    per_shard = scan_labels(urls, handler)
    chosen = set(select_few_shot((pair for shard in per_shard for pair in shard), k, seed))
    return [[key for key, _ in shard if key in chosen] for shard in per_shard]
