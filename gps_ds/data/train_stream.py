"""Training stream: shards split by rank and worker, endless, a fixed number of batches.

All readers (ranks x DataLoader workers) walk the same random order of the shards
(a new one for each pass and epoch); reader ``g`` of ``G`` reads positions ``g, g + G,
g + 2G, ...`` of that endless walk. With at least as many shards as readers, their shards
are disjoint within a pass; with fewer, they take turns; nobody ever runs dry, whatever
the shard sizes. Every rank yields exactly ``steps`` batches per epoch (its workers share
them out). Corrupt shards and samples are skipped and counted; a stream that finds no
readable sample at all stops with an error instead of spinning forever.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Optional

import torch
import webdataset as wds
from webdataset.tariterators import tarfile_samples

from .corrupt import CorruptCounter, classify
from .samples import SampleProcessor, collate, mix_seed, worker_info

#: A worker that reads this many shards in a row (at least) without a single sample,
#: or fails this many samples in a row, gives up with an error.
MIN_EMPTY_SHARDS = 20
MAX_FAILED_SAMPLES = 10_000


class NoDataError(ValueError, RuntimeError):
    """No readable sample in the training shards."""


def shard_sequence(urls: list[str], seed: int, epoch: int, reader: int, readers: int) -> Iterator[str]:
    """The endless sequence of shards that ``reader`` (of ``readers``) reads in ``epoch``."""
    pos, current, order = reader, -1, list(urls)
    while True:
        walk, i = divmod(pos, len(urls))
        if walk != current:
            order = list(urls)
            random.Random(mix_seed(seed, epoch, walk)).shuffle(order)
            current = walk
        yield order[i]
        pos += readers


class TrainStream(torch.utils.data.IterableDataset):
    """Batches ``(inputs, targets)``; ``steps`` of them per epoch on each rank."""

    def __init__(self, urls: list[str], *, rank: int, world_size: int, steps: int, batch_size: int,
                 processor: SampleProcessor, counter: CorruptCounter, shuffle_buffer: int = 1000, seed: int = 0,
                 keys: Optional[frozenset[str]] = None) -> None:
        super().__init__()
        if not urls:
            raise ValueError("no training shards")
        self.urls = list(urls)
        self.rank = rank
        self.world_size = world_size
        self.steps = steps
        self.batch_size = batch_size
        self.processor = processor
        self.counter = counter
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.keys = keys
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard_urls(self, reader: int, readers: int, state: dict[str, int]) -> Iterator[dict[str, str]]:
        limit = max(MIN_EMPTY_SHARDS, 3 * len(self.urls))
        for url in shard_sequence(self.urls, self.seed, self.epoch, reader, readers):
            if state["since_sample"] >= limit:
                raise NoDataError(f"read {limit} shards in a row without one readable sample "
                                  f"(rank {self.rank}; shards {self.urls[:3]}...): are they all corrupt or empty?")
            state["since_sample"] += 1
            yield {"url": url}

    def _samples(self, reader: int, readers: int) -> Iterator[dict[str, Any]]:
        state = {"since_sample": 0}
        for sample in tarfile_samples(self._shard_urls(reader, readers, state), handler=self.counter.handler):
            state["since_sample"] = 0
            if self.keys is None or sample["__key__"] in self.keys:
                yield sample

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        wid, nworkers = worker_info()
        quota = self.steps // nworkers + (wid < self.steps % nworkers)
        if quota == 0:
            return
        rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, wid))
        stream = self._samples(self.rank * nworkers + wid, self.world_size * nworkers)
        if self.shuffle_buffer > 1:
            stream = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(stream)
        batch: list = []
        done = failed = 0
        for sample in stream:
            try:
                batch.append(self.processor(sample))
                failed = 0
            except Exception as exn:  # noqa: BLE001 - skipped and counted
                self.counter.add(classify(exn), f"{sample.get('__key__')} in {sample.get('__url__')}: {exn!r}")
                failed += 1
                if failed >= MAX_FAILED_SAMPLES:
                    raise NoDataError(f"{failed} samples in a row could not be decoded (last: {exn!r})") from exn
                continue
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
                done += 1
                if done == quota:
                    return
