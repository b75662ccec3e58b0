"""Deterministic tar writing on webdataset's own ``TarWriter``: same samples in, byte-identical
shard out.

``TarWriter`` stamps every member with ``time.time()`` unless given ``mtime``; here every member
gets mtime 0, no owner names and mode 0444, and members are written in the order of the samples
(within a sample, TarWriter orders the files by extension), so a shard depends only on its
samples."""

from __future__ import annotations

from typing import Iterable, Mapping

import webdataset as wds

MTIME = 0
MODE = 0o444


def write_tar(path: str, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> int:
    """Write ``(key, {ext: bytes})`` samples to ``path`` as ``key.ext`` members.

    Keys must not contain a dot (webdataset splits the name at the first dot).
    Returns the number of samples written."""
    n = 0
    with wds.TarWriter(str(path), user="", group="", mode=MODE, mtime=MTIME, encoder=False) as tar:
        for key, files in samples:
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
            tar.write({"__key__": key, **files})
            n += 1
    return n
