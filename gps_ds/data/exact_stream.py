"""Exactly-once streams: evaluation (every sample once across all ranks, padded) and
the GPS scoring pass (one epoch, last partial global batch dropped).

Samples, not shards, are assigned: with ``N`` samples in shard order, rank ``r`` owns
the contiguous range ``[N*r//W, N*(r+1)//W)`` (evaluation) or ``[r*B*b, (r+1)*B*b)``
(scoring, ``B = N // (W*b)``). Every rank runs the same ``B`` batches of ``b``; in
evaluation the slots past a rank's range are filled with copies of a real sample and
marked ``valid=False``. A rank's batches are shared out among its DataLoader workers
in contiguous blocks; each worker reads only the shards overlapping its block.

A sample that cannot be read keeps its slot: it is replaced by a copy of a readable
sample (``valid=False`` in evaluation) and counted, so batch counts never change.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import torch
from webdataset.tariterators import base_plus_ext, tarfile_samples

from .corrupt import CorruptCounter, classify
from .samples import SampleProcessor, SegTargets, collate, worker_info  # noqa: F401 - SegTargets re-exported
from .train_stream import NoDataError


class EvalBatch(NamedTuple):
    """One evaluation batch. ``valid[i]`` is False for padding and unreadable samples:
    leave those out of every metric.

    ``targets``: class indices ``int64 [B]`` (classification), or for segmentation a
    :class:`~gps_ds.data.samples.SegTargets` ``(masks, originals)``: ``masks`` float
    ``[B, 1, S, S]`` in {0, 1}, resized and padded like the inputs; ``originals`` a list
    of ``B`` bool ``[H_i, W_i]`` masks at the images' original resolution (what the
    metrics compare against). Entry ``i`` of ``inputs``, ``masks``, ``originals``,
    ``valid`` and ``keys`` is the same sample (padding copies included, with key ``""``)."""

    inputs: Any
    targets: Any
    valid: torch.Tensor
    keys: list[str]


def rank_plan(total: int, rank: int, world_size: int, batch_size: int, drop_last: bool) -> tuple[int, int, int]:
    """``(start, stop, batches)``: the global sample range of ``rank`` and the number of
    batches every rank runs."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if drop_last:
        batches = total // (world_size * batch_size)
        start = rank * batches * batch_size
        return start, start + batches * batch_size, batches
    start, stop = total * rank // world_size, total * (rank + 1) // world_size
    return start, stop, math.ceil(math.ceil(total / world_size) / batch_size)


def worker_plan(start: int, stop: int, batches: int, batch_size: int, worker: int, workers: int) -> tuple[int, int, int]:
    """``(start, stop, slots)`` of one worker: a contiguous block of the rank's batches."""
    b0, b1 = batches * worker // workers, batches * (worker + 1) // workers
    count = stop - start
    return start + min(b0 * batch_size, count), start + min(b1 * batch_size, count), (b1 - b0) * batch_size


class ExactStream(torch.utils.data.IterableDataset):
    """Yields :class:`EvalBatch` (``drop_last=False``) or ``(inputs, targets)`` batches
    (``drop_last=True``, the scoring pass)."""

    def __init__(self, urls: Sequence[str], counts: Sequence[int], *, rank: int, world_size: int,
                 batch_size: int, processor: SampleProcessor, counter: CorruptCounter, drop_last: bool = False,
                 keys: Optional[Sequence[Sequence[str]]] = None) -> None:
        """``counts[i]`` samples in shard ``urls[i]``; or, with ``keys`` (a subset such as a
        few-shot selection: the keys to read from each shard, in shard order), only those."""
        super().__init__()
        self.urls = list(urls)
        self.keys = [list(k) for k in keys] if keys is not None else None
        self.counts = [len(k) for k in self.keys] if self.keys is not None else [int(c) for c in counts]
        self.offsets = [sum(self.counts[:i]) for i in range(len(self.counts))]
        self.total = sum(self.counts)
        if self.total == 0:
            raise NoDataError(f"no samples in {self.urls[:3]}...")
        self.batch_size = batch_size
        self.processor = processor
        self.counter = counter
        self.drop_last = drop_last
        self.start, self.stop, self.batches = rank_plan(self.total, rank, world_size, batch_size, drop_last)
        if self.batches == 0:
            raise ValueError(f"{self.total} samples make no full batch of {batch_size} x {world_size} ranks")

    def set_epoch(self, epoch: int) -> None:  # the same samples every epoch
        pass

    def _selector(self, shard: int, lo: int, hi: int) -> Callable[[str], bool]:
        """Select the tar members of the shard's samples ``lo..hi-1`` (by position, or by key)."""
        if self.keys is not None:
            wanted = set(self.keys[shard][lo:hi])
            return lambda name: base_plus_ext(name)[0] in wanted
        seen: list = [None, -1]  # last key, its position

        def by_position(name: str) -> bool:
            key, _ = base_plus_ext(name)
            if key != seen[0]:
                seen[0], seen[1] = key, seen[1] + 1
            return lo <= seen[1] < hi

        return by_position

    def _read(self, start: int, stop: int, quiet: bool = False) -> Iterator[dict[str, Any]]:
        """Raw samples with index in ``[start, stop)``, in order; bad shards and a shortfall
        are counted (unless ``quiet``: a second look at data already counted)."""
        handler = (lambda exn: True) if quiet else self.counter.handler
        for shard, (url, offset, count) in enumerate(zip(self.urls, self.offsets, self.counts)):
            lo, hi = max(start, offset) - offset, min(stop, offset + count) - offset
            if lo >= hi:
                continue
            got = 0
            for sample in tarfile_samples([{"url": url}], handler=handler,
                                          select_files=self._selector(shard, lo, hi)):
                yield sample
                got += 1
                if got == hi - lo:
                    break
            if got < hi - lo and not quiet:
                self.counter.add("missing_sample", f"{hi - lo - got} of samples {lo}..{hi - 1} not found in {url}",
                                 n=hi - lo - got)

    def _template(self) -> tuple[Any, Any]:
        """The first decodable sample of the whole set (to fill slots nothing else fills)."""
        for sample in self._read(0, self.total, quiet=True):
            try:
                return self.processor.decode(sample)
            except Exception:  # noqa: BLE001 - keep looking
                continue
        raise NoDataError(f"no decodable sample in {self.urls[:3]}... ({self.total} listed)")

    def _emit(self, buf: list, item: tuple) -> Optional[Any]:
        buf.append(item)
        if len(buf) < self.batch_size:
            return None
        items = list(buf)
        buf.clear()
        x, y = collate([(i[0], i[1]) for i in items])
        if self.drop_last:
            return x, y
        return EvalBatch(x, y, torch.tensor([i[2] for i in items], dtype=torch.bool), [i[3] for i in items])

    def __iter__(self) -> Iterator[Any]:
        wid, nworkers = worker_info()
        start, stop, slots = worker_plan(self.start, self.stop, self.batches, self.batch_size, wid, nworkers)
        buf: list = []
        template = None
        real = 0
        for sample in self._read(start, stop):
            key = sample.get("__key__", "")
            try:
                img, target = self.processor.decode(sample)
                x, y = self.processor.apply(img, target)
            except Exception as exn:  # noqa: BLE001 - slot refilled below, counted here
                self.counter.add(classify(exn), f"{key} in {sample.get('__url__')}: {exn!r}")
                continue
            template = template or (img, target)
            real += 1
            batch = self._emit(buf, (x, y, True, key))
            if batch is not None:
                yield batch
        if slots > real and template is None:
            template = self._template()
        for _ in range(slots - real):
            x, y = self.processor.apply(*template)
            batch = self._emit(buf, (x, y, False, ""))
            if batch is not None:
                yield batch
