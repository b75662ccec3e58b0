"""Where a split's shards are, and how many samples each holds.

A spec is a folder written by ``gps-ds shards`` (its ``_info.json`` lists every split's
shards and their sample counts), or webdataset URLs — a local path, a brace pattern,
``a::b``, ``pipe:CMD``, ``http(s)://...`` — or a list of those.

Counts come from the manifest, the ``_info.json`` that ``gps-ds shards`` writes beside the
shards: read from the folder for local shards, fetched once per folder URL for remote ones
(``http(s)://host/dir/train-{0..9}.tar`` -> ``http(s)://host/dir/_info.json``). Shards
without one (``pipe:`` URLs, shards written by other tools) are counted by reading them,
each shard once overall: under ``torch.distributed`` every rank counts its share and one
all-reduce gives every rank the same exact counts (see :meth:`ShardSet.with_counts`).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_expander, url_opener

from .writer import FORMAT, INFO_NAME


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
        """A copy where every unknown count has been found by reading its shard.

        Each such shard is read once overall: in a process group of W ranks, rank r reads
        unknown shards r, r + W, ... and an all-reduce (sum) on the accelerator device hands
        every rank the same exact counts. Collective when some count is unknown: every rank of
        the group must call it (as the loaders do); a world of one reads them all itself.
        """
        unknown = [i for i, c in enumerate(self.counts) if c is None]
        if not unknown:
            return ShardSet(list(self.urls), list(self.counts), self.info)
        rank, world = _group()
        if rank == 0:
            where = sorted({os.path.dirname(self.urls[i]) or "." for i in unknown})
            print(f"gps-ds data: no {INFO_NAME} gives the sample counts of {len(unknown)} shard(s) in "
                  f"{', '.join(where[:3])}{' ...' if len(where) > 3 else ''}: counting them by reading each "
                  f"shard once, split over {world} rank(s); 'gps-ds shards index' writes the {INFO_NAME} that "
                  f"spares this (put it beside the shards)", file=sys.stderr)
        found = [0] * len(unknown)
        for j in range(rank, len(unknown), world):
            found[j] = count_samples(self.urls[unknown[j]], handler)
        if world > 1:
            found = _all_reduce_counts(found)
        counts = list(self.counts)
        for j, i in enumerate(unknown):
            counts[i] = found[j]
        return ShardSet(list(self.urls), counts, self.info)


def _group() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_counts(values: list[int]) -> list[int]:
    from gps_ds.distributed import accelerator_device, all_reduce_

    # On the accelerator (NCCL refuses host tensors). A gloo group that DeepSpeed never set up
    # (plain torch.distributed) can only mean the CPU: skip DeepSpeed's slow import there.
    gloo_only = torch.distributed.get_backend() == "gloo" and "deepspeed" not in sys.modules
    device = torch.device("cpu") if gloo_only else accelerator_device()
    return [int(v) for v in all_reduce_(torch.tensor(values, dtype=torch.int64, device=device)).tolist()]


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


def _manifest_url(url: str) -> Optional[str]:
    """Where the manifest of a remote shard would be; None for ``pipe:`` (no folder to look in)."""
    if url.startswith("pipe:") or "/" not in url.split("://", 1)[-1]:
        return None
    return url.rsplit("/", 1)[0] + "/" + INFO_NAME


@functools.lru_cache(maxsize=64)
def _fetch_manifest(url: str) -> Optional[dict[str, Any]]:
    """A remote ``_info.json`` (one small read per process and folder), or None when there is
    none or it cannot be read."""
    try:
        with gopen(url, "rb") as stream:
            info = json.loads(stream.read())
        _shard_table(info)  # well-formed?
        return info
    except Exception:  # noqa: BLE001 - no manifest (404, no route, not JSON): the shards get counted
        return None


def _shard_table(info: dict[str, Any]) -> dict[str, int]:
    """``{shard file name: samples}`` over every split of a manifest."""
    return {s["name"]: int(s["samples"]) for sp in info.get("splits", {}).values() for s in sp["shards"]}


def _from_urls(spec: str) -> ShardSet:
    urls = expand_urls(spec)
    counts: list[Optional[int]] = []
    infos: dict[Optional[str], Optional[dict[str, int]]] = {}  # folder or manifest URL -> counts
    first_info = None
    for url in urls:
        if not is_local(url):
            manifest = _manifest_url(url)
            if manifest not in infos:
                info = _fetch_manifest(manifest) if manifest else None
                first_info = first_info or info
                infos[manifest] = _shard_table(info) if info else None
            table = infos[manifest]
            counts.append(table.get(url.rsplit("/", 1)[-1]) if table else None)
            continue
        if not os.path.isfile(url):
            raise FileNotFoundError(f"shard {url} does not exist (from {spec!r})")
        folder = os.path.dirname(os.path.abspath(url))
        if folder not in infos:
            infos[folder] = None
            if os.path.isfile(os.path.join(folder, INFO_NAME)):
                info = read_info(folder)
                first_info = first_info or info
                infos[folder] = _shard_table(info)
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


def write_index(out: Union[str, os.PathLike], splits: dict[str, str], *, num_classes: Optional[int] = None,
                workers: int = 4, overwrite: bool = False) -> dict[str, Any]:
    """Count the shards of each split (``{split: webdataset spec}``, e.g. shards written by another
    tool) and write the manifest ``out`` (an ``_info.json``) that :func:`resolve` reads instead of
    counting. The shards of one manifest must share a folder (the manifest goes beside them:
    copy it there when they are remote). Returns the manifest."""
    import concurrent.futures as cf

    from .corrupt import CorruptCounter

    out = Path(out)
    if out.name != INFO_NAME:
        raise ValueError(f"the manifest must be named {INFO_NAME} (the readers look for that name), got {out}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    info: dict[str, Any] = {"format": FORMAT, "kind": "index", "classes": None, "num_classes": num_classes,
                            "splits": {}}
    folders = set()
    for split, spec in splits.items():
        urls = expand_urls(spec)
        if not urls:
            raise ValueError(f"split {split!r}: no shards in {spec!r}")
        folders |= {u.rsplit("/", 1)[0] if "/" in u else "." for u in urls}
        counter = CorruptCounter()
        with cf.ThreadPoolExecutor(max(1, workers)) as pool:  # reading is I/O: threads suffice
            counts = list(pool.map(lambda u: count_samples(u, counter.handler), urls))
        if counter.total:
            raise ValueError(f"split {split!r}: {counter.total} shard(s) could not be read to the end "
                             f"({counter.counts()}); fix or drop them before indexing")
        names = [u.rsplit("/", 1)[-1] for u in urls]
        if len(set(names)) != len(names):
            raise ValueError(f"split {split!r}: two shards share a file name")
        info["splits"][split] = {"size": sum(counts), "skipped": 0, "skipped_keys": [],
                                 "shards": [{"name": n, "samples": c} for n, c in zip(names, counts)]}
    if len(folders) > 1:
        raise ValueError(f"the shards of one manifest must share a folder, got {sorted(folders)[:3]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(info, sort_keys=True, indent=1) + "\n")
    tmp.replace(out)
    return info
