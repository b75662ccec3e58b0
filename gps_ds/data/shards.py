"""Where a split's shards are, and how many samples each holds.

A spec is a folder written by ``gps-ds shards`` (its ``_info.json`` lists every split's
shards and their sample counts), or webdataset URLs — a local path, a brace pattern,
``a::b``, ``pipe:CMD``, ``http(s)://...`` — or a list of those. Counts come from the
``_info.json`` beside local shards when there is one; otherwise they are counted by
reading the shards (only needed for exactly-once evaluation).
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_expander, url_opener

from .writer import INFO_NAME


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def read_info(folder: Union[str, os.PathLike]) -> dict[str, Any]:
    """The ``_info.json`` of a shard folder."""
    path = Path(folder) / INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {INFO_NAME}: not a folder written by 'gps-ds shards'")
    return json.loads(path.read_text())


@dataclass
class ShardSet:
    """Shard URLs of one or more splits, with per-shard sample counts when known."""

    urls: list[str]
    counts: list[Optional[int]]
    info: Optional[dict[str, Any]] = None

    @property
    def size(self) -> Optional[int]:
        """Total samples, or ``None`` if some shard's count is unknown."""
        return None if any(c is None for c in self.counts) else sum(self.counts)

    def with_counts(self, handler: Optional[Callable[[BaseException], bool]] = None) -> "ShardSet":
        """A copy where every unknown count has been found by reading its shard."""
        counts = [c if c is not None else count_samples(u, handler) for u, c in zip(self.urls, self.counts)]
        return ShardSet(list(self.urls), counts, self.info)


def count_samples(url: str, handler: Optional[Callable[[BaseException], bool]] = None) -> int:
    """Samples in one shard (distinct keys). A shard that breaks off counts what could be
    read; the error goes to ``handler`` (e.g. a corrupt-data counter) if given."""
    keys: list[str] = []

    def add(name: str) -> None:
        key, _ = base_plus_ext(name)
        if key is not None and (not keys or keys[-1] != key):
            keys.append(key)

    try:
        if is_local(url):
            with tarfile.open(url, "r:") as tar:
                for member in tar:
                    if member.isfile():
                        add(member.name)
                if os.path.getsize(url) - tar.offset < 2 * tarfile.BLOCKSIZE:  # no end-of-archive blocks
                    raise tarfile.ReadError(f"truncated tar: {len(keys)} samples readable")
        else:  # stream it; names are seen by the selector, no member data is kept
            streams = url_opener([{"url": url}])
            for _ in tar_file_expander(streams, select_files=lambda name: add(name) or False):
                pass
    except (tarfile.TarError, OSError, EOFError) as exn:
        if handler is not None:
            exn.args = tuple(exn.args) + (url,)
            handler(exn)
    return len(keys)


def _from_folder(folder: Path, splits: Sequence[str]) -> ShardSet:
    info = read_info(folder)
    urls, counts = [], []
    for split in splits:
        if split not in info.get("splits", {}):
            raise KeyError(f"{folder}: no split {split!r} (has: {', '.join(sorted(info.get('splits', {})))})")
        for shard in info["splits"][split]["shards"]:
            urls.append(str(folder / shard["name"]))
            counts.append(int(shard["samples"]))
    return ShardSet(urls, counts, info)


def _from_urls(spec: str) -> ShardSet:
    urls = expand_urls(spec)
    counts: list[Optional[int]] = []
    infos: dict[str, Optional[dict[str, int]]] = {}
    first_info = None
    for url in urls:
        if not is_local(url):
            counts.append(None)
            continue
        if not os.path.isfile(url):
            raise FileNotFoundError(f"shard {url} does not exist (from {spec!r})")
        folder = os.path.dirname(os.path.abspath(url))
        if folder not in infos:
            infos[folder] = None
            if os.path.isfile(os.path.join(folder, INFO_NAME)):
                info = read_info(folder)
                first_info = first_info or info
                infos[folder] = {s["name"]: int(s["samples"]) for sp in info.get("splits", {}).values()
                                 for s in sp["shards"]}
        table = infos[folder]
        counts.append(table.get(os.path.basename(url)) if table else None)
    return ShardSet(urls, counts, first_info)


def resolve(spec: Union[str, Sequence[str]], split: Union[str, Sequence[str]] = "train") -> ShardSet:
    """The shards of ``split`` (one name or several, concatenated) named by ``spec``."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    splits = [split] if isinstance(split, str) else list(split)
    if not specs:
        raise ValueError("empty shard spec")
    urls: list[str] = []
    counts: list[Optional[int]] = []
    info = None
    for one in specs:
        one = os.path.expanduser(str(one))
        part = _from_folder(Path(one), splits) if os.path.isdir(one) else _from_urls(one)
        urls += part.urls
        counts += part.counts
        info = info or part.info
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return ShardSet(urls, counts, info)
