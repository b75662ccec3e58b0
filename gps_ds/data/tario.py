"""Deterministic tar writing: same samples in, byte-identical shard out.

Every member gets the same mtime, owner and mode, and members are written in the
order given, so a shard depends only on its samples."""

from __future__ import annotations

import io
import tarfile
from typing import Iterable, Mapping

MTIME = 0
MODE = 0o444


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = MTIME
    info.mode = MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_tar(path: str, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> int:
    """Write ``(key, {ext: bytes})`` samples to ``path`` as ``key.ext`` members.

    Keys must not contain a dot (webdataset splits the name at the first dot).
    Returns the number of samples written."""
    n = 0
    with open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, files in samples:
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
            for ext, data in files.items():
                tar.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
            n += 1
    return n
