"""Loaders a trainer uses: ``make_train_loader``, ``make_eval_loader``, ``make_score_loader``.

Each returns a :class:`Loader`: iterable, ``len()`` = batches per epoch (the same on
every rank), ``.counter`` with the corrupt-data counts, ``.set_epoch(e)`` (called
automatically: each ``iter()`` starts the next epoch).

The accelerator pipeline: workers decode and crop to uint8 batches (``Loader.raw()``), pinned
when ``data.pin_memory`` says so (auto: on CUDA), which the main process copies to ``device``
with ``non_blocking=True`` and normalises and mixes (mixup/cutmix) there. Pass the config
through :func:`~gps_ds.data.transforms.resolve_data` first for the model's normalisation.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Iterator, Optional, Union

import torch

from . import shards as shardlib
from .config import DataConfig
from .corrupt import CorruptCounter
from .exact_stream import EvalBatch, ExactStream
from .fewshot import few_shot_selection
from .samples import SampleProcessor, mix_seed
from .train_stream import TrainStream
from .transforms import (BatchNormalize, build_batch_normalize, build_eval_transform, build_mixup,
                         build_train_transform, build_two_view_transform)

Device = Optional[Union[str, torch.device]]


def _worker_context() -> Optional[str]:
    """Fork DataLoader workers where the platform can: workers only decode and transform on
    the CPU, and a rank started by 'spawn' would otherwise re-import everything per worker."""
    return "fork" if sys.platform.startswith("linux") else None


def _pin(cfg: DataConfig, device: Device) -> bool:
    """Pinned batches only help (and only work) for a CUDA device; ``pin_memory=True`` elsewhere is a no-op."""
    on_cuda = device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()
    return on_cuda and cfg.pin_memory in (True, "auto")


def _finish_batch(normalize: BatchNormalize, mixup: Optional[Callable] = None) -> Callable[[Any], Any]:
    """Batch post-processing in the main process: uint8 -> normalised float, everything
    moved to the loader's device (if any), then mixup/cutmix.

    Segmentation images arrive already normalised (float32; the padding must be exact zeros
    after normalisation, as ``Sam.preprocess`` pads), so ``normalize`` passes them through
    and they are only moved, with the masks and, in evaluation, the list of original masks."""
    dev = normalize.device

    def move(t: Any) -> Any:
        if dev is None:
            return t
        if isinstance(t, tuple) and hasattr(t, "_fields"):  # SegTargets (masks, originals)
            return type(t)(*(move(v) for v in t))
        if isinstance(t, (tuple, list)):
            return type(t)(move(v) for v in t)
        return t.to(dev, non_blocking=True)

    def finish(batch: Any) -> Any:
        if isinstance(batch, EvalBatch):
            return batch._replace(inputs=move(normalize(batch.inputs)), targets=move(batch.targets),
                                  valid=move(batch.valid))
        x, y = batch
        x, y = move(normalize(x)), move(y)
        if mixup is not None:
            x, y = mixup(x, y)
        return x, y

    return finish


class Loader:
    """A DataLoader over one of the streams, with a length and an epoch counter."""

    def __init__(self, dataset: Union[TrainStream, ExactStream], length: int, workers: int,
                 counter: CorruptCounter, seed: int = 0, rank: int = 0,
                 batch_fn: Optional[Callable[[Any], Any]] = None, pin_memory: bool = False,
                 prefetch: int = 4) -> None:
        self.dataset = dataset
        self.pin_memory = pin_memory
        self.prefetch = prefetch
        self.length = length
        self.workers = min(workers, length)
        self.counter = counter
        self.seed = seed
        self.rank = rank
        self.batch_fn = batch_fn
        self.epoch = 0
        self._skip = 0
        self._after_skip: Optional[Callable[[], None]] = None

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next ``iter()`` runs (they count up from there)."""
        self.epoch = epoch

    def skip_next(self, batches: int, then: Optional[Callable[[], None]] = None) -> None:
        """The next ``iter()`` reads and drops its first ``batches`` batches (a resumed run winds the
        epoch's stream forward), then calls ``then`` before producing the first batch it yields."""
        if not 0 <= batches <= self.length:
            raise ValueError(f"cannot skip {batches} of {self.length} batches")
        self._skip, self._after_skip = batches, then

    def __iter__(self) -> Iterator[Any]:
        """Batches on the loader's device, normalised (and mixed for training)."""
        for batch in self.raw():
            yield self.batch_fn(batch) if self.batch_fn is not None else batch

    def raw(self) -> Iterator[Any]:
        """The batches as the DataLoader hands them over: uint8 images (float for segmentation),
        pinned when configured, on the CPU; one epoch, as ``iter()``."""
        skip, after_skip = self._skip, self._after_skip
        self._skip, self._after_skip = 0, None
        epoch = self.epoch
        self.epoch += 1
        self.dataset.set_epoch(epoch)
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, self.rank, 1))  # worker transform seeds
        kwargs = ({"prefetch_factor": self.prefetch, "multiprocessing_context": _worker_context()}
                  if self.workers > 0 else {})
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                                             generator=gen, persistent_workers=False,
                                             pin_memory=self.pin_memory, **kwargs)
        n = 0
        if after_skip is not None and skip == 0:
            after_skip()
        for batch in loader:
            n += 1
            if n <= skip:
                if n == skip and after_skip is not None:
                    after_skip()
                continue
            yield batch
        if n != self.length:  # a bug, never corrupt data: fail loudly rather than desynchronise ranks
            raise RuntimeError(f"data loader yielded {n} batches, expected {self.length}")


def _rank_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _spec(cfg: DataConfig, which: str) -> tuple[Any, Any]:
    spec = getattr(cfg, which)
    if spec is None:
        raise ValueError(f"data.{which} is not set: name a shard folder or webdataset URLs")
    return spec, getattr(cfg, f"{which}_split")


def resolve_num_classes(cfg: DataConfig) -> int:
    """``cfg.num_classes``, else the ``num_classes`` of the train (or test) shards' _info.json."""
    if cfg.num_classes is not None:
        return cfg.num_classes
    for which in ("train", "test", "val"):
        if getattr(cfg, which) is not None:
            info = shardlib.resolve(*_spec(cfg, which)).info
            if info and info.get("num_classes"):
                return int(info["num_classes"])
    raise ValueError("data.num_classes is not set and no _info.json gives it")


def _label_count(cfg: DataConfig) -> Optional[int]:
    """The class count labels are checked against (None: segmentation, or not known)."""
    if cfg.recipe == "segmentation":
        return None
    try:
        return resolve_num_classes(cfg)
    except ValueError:
        return None


def few_shot_keys(cfg: DataConfig, urls: list[str], counter: Optional[CorruptCounter] = None) -> list[list[str]]:
    """The keys of the ``cfg.few_shot`` samples per class, per shard (same on every rank)."""
    return few_shot_selection(urls, cfg.few_shot, cfg.seed, handler=counter.handler if counter is not None else None)


def train_steps(cfg: DataConfig, train_size: int, global_batch: int) -> int:
    """``cfg.steps_per_epoch``, else ``ceil(train_size / global_batch)``."""
    return cfg.steps_per_epoch or max(1, math.ceil(train_size / global_batch))


def make_train_loader(cfg: DataConfig, rank: Optional[int] = None, world_size: Optional[int] = None,
                      batch_size_per_rank: int = 32, transform: Optional[Callable] = None,
                      counter: Optional[CorruptCounter] = None, device: Device = None) -> Loader:
    """Training batches ``(images, labels)`` (``(images, masks)`` for segmentation).

    Shards split by rank and worker over an endless shuffled walk (see
    :mod:`gps_ds.data.train_stream`), ``len()`` = ``steps_per_epoch`` or ``ceil(train_size /
    (batch x world_size))`` on every rank. With mixup/cutmix configured, labels are soft targets
    (``[B, num_classes]`` float; use :func:`gps_ds.data.build_train_criterion`).

    ``transform``: ``image -> tensor`` (``(image, mask) -> (tensor, tensor)`` for
    segmentation); default the recipe's. uint8 outputs are normalised per batch in the
    main process, on ``device`` if given (then images arrive there already, normalised and
    mixed there)."""
    rank, world_size = _rank_world(rank, world_size)
    counter = counter or CorruptCounter(slots=cfg.workers + 1)
    shardset = shardlib.resolve(*_spec(cfg, "train"))
    urls, keys = shardset.urls, None
    if cfg.few_shot:
        per_shard = few_shot_keys(cfg, shardset.urls, counter)
        urls = [u for u, k in zip(shardset.urls, per_shard) if k]  # only shards holding chosen samples
        keys = frozenset(k for ks in per_shard for k in ks)
        size = len(keys)
    else:
        size = cfg.train_size or shardset.size or shardset.with_counts(counter.handler).size
    steps = train_steps(cfg, size, batch_size_per_rank * world_size)
    seg = cfg.recipe == "segmentation"
    processor = SampleProcessor(transform or build_train_transform(cfg, uint8=True), segmentation=seg,
                                num_classes=_label_count(cfg))
    stream = TrainStream(urls, rank=rank, world_size=world_size, steps=steps, batch_size=batch_size_per_rank,
                         processor=processor, counter=counter, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                         keys=keys)
    mixup = build_mixup(cfg, resolve_num_classes(cfg)) if cfg.mixup.mixing else None
    if mixup is not None and batch_size_per_rank % 2:
        raise ValueError(f"mixup/cutmix need an even batch size per rank, got {batch_size_per_rank}")
    return Loader(stream, steps, cfg.workers, counter, seed=cfg.seed, rank=rank,
                  batch_fn=_finish_batch(build_batch_normalize(cfg, device), mixup), pin_memory=_pin(cfg, device),
                  prefetch=cfg.prefetch)


def _exact_loader(cfg: DataConfig, which: str, rank: Optional[int], world_size: Optional[int], batch_size: int,
                  transform: Callable, counter: Optional[CorruptCounter], drop_last: bool, device: Device) -> Loader:
    rank, world_size = _rank_world(rank, world_size)
    counter = counter or CorruptCounter(slots=cfg.workers + 1)
    shardset = shardlib.resolve(*_spec(cfg, which))
    keys = few_shot_keys(cfg, shardset.urls, counter) if (which == "train" and cfg.few_shot) else None
    counts = shardset.counts if keys is not None else shardset.with_counts(counter.handler).counts
    seg = cfg.recipe == "segmentation"
    processor = SampleProcessor(transform, segmentation=seg, originals=seg and not drop_last,
                                num_classes=_label_count(cfg))
    stream = ExactStream(shardset.urls, counts, rank=rank, world_size=world_size, batch_size=batch_size,
                         processor=processor, counter=counter, drop_last=drop_last, keys=keys)
    return Loader(stream, stream.batches, cfg.workers, counter, seed=cfg.seed, rank=rank,
                  batch_fn=_finish_batch(build_batch_normalize(cfg, device)), pin_memory=_pin(cfg, device),
                  prefetch=cfg.prefetch)


def make_eval_loader(cfg: DataConfig, rank: Optional[int] = None, world_size: Optional[int] = None,
                     batch_size_per_rank: int = 32, transform: Optional[Callable] = None,
                     split: str = "test", counter: Optional[CorruptCounter] = None, device: Device = None) -> Loader:
    """Evaluation batches :class:`~gps_ds.data.exact_stream.EvalBatch` ``(inputs, targets,
    valid, keys)`` over ``cfg.test`` (``split="val"``: ``cfg.val``). Every sample appears
    exactly once with ``valid=True`` across all ranks; all ranks run ``len()`` batches.
    Segmentation targets are ``SegTargets(masks [B, 1, S, S], originals)`` (see
    :class:`~gps_ds.data.exact_stream.EvalBatch`)."""
    if split not in ("test", "val", "train"):
        raise ValueError(f"split must be 'test', 'val' or 'train', got {split!r}")
    return _exact_loader(cfg, split, rank, world_size, batch_size_per_rank,
                         transform or build_eval_transform(cfg, uint8=True), counter, drop_last=False, device=device)


def make_score_loader(cfg: DataConfig, rank: Optional[int] = None, world_size: Optional[int] = None,
                      batch_size_per_rank: int = 32, transform: Optional[Callable] = None,
                      two_view: bool = True, counter: Optional[CorruptCounter] = None, device: Device = None) -> Loader:
    """The GPS scoring pass: one epoch over the training split, each sample at most once,
    the last partial global batch dropped, equal batches on every rank. Yields
    ``((view1, view2), labels)`` (SupCon views) or, with ``two_view=False``, ``(images,
    labels)`` through the recipe's training transform (cross-entropy scoring,
    segmentation)."""
    if transform is None:
        two = two_view and cfg.recipe != "segmentation"
        transform = build_two_view_transform(cfg, uint8=True) if two else build_train_transform(cfg, uint8=True)
    return _exact_loader(cfg, "train", rank, world_size, batch_size_per_rank, transform, counter,
                         drop_last=True, device=device)
