"""Corrupt-sample accounting: skip, warn (rate-limited), count; never crash or hang.

A :class:`CorruptCounter` lives in shared memory so that DataLoader worker processes
and the main process add to the same numbers; the trainer logs ``counter.as_metrics()``.
"""

from __future__ import annotations

import tarfile
import warnings
from typing import Optional

import torch

#: What went wrong, in the order of the counter's columns.
KINDS = ("bad_shard", "decode", "missing_key", "missing_sample", "label", "other")
_MAX_WARNINGS = 20
_warned = 0


class CorruptDataWarning(RuntimeWarning):
    """A sample or shard was skipped because it could not be read."""


def _worker_slot() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id + 1


def warn_corrupt(kind: str, detail: str) -> None:
    """Warn about a skipped sample; after a few warnings per process, stay quiet."""
    global _warned
    _warned += 1
    if _warned <= _MAX_WARNINGS:
        warnings.warn(f"gps-ds data: skipped ({kind}): {detail}", CorruptDataWarning, stacklevel=3)
    if _warned == _MAX_WARNINGS:
        warnings.warn("gps-ds data: further corrupt-data warnings in this process are suppressed "
                      "(see the data/corrupt_* metrics)", CorruptDataWarning, stacklevel=3)


def classify(exn: BaseException) -> str:
    """Map an exception raised while reading a shard or sample to one of :data:`KINDS`."""
    from .decode import LabelError

    if isinstance(exn, KeyError):
        return "missing_key"
    if isinstance(exn, LabelError):
        return "label"
    if isinstance(exn, (tarfile.TarError, EOFError)):
        return "bad_shard"
    if isinstance(exn, ValueError) and "duplicate file name" in str(exn):
        return "bad_shard"
    if isinstance(exn, (OSError, ValueError)):  # PIL.UnidentifiedImageError is an OSError
        return "decode"
    return "other"


class CorruptCounter:
    """Counts of skipped data, shared between the DataLoader workers of one loader.

    ``slots`` is the number of processes that may add (workers + 1); each process
    writes its own row, so no lock is needed.
    """

    def __init__(self, slots: int = 1) -> None:
        self._table = torch.zeros(max(1, slots), len(KINDS), dtype=torch.int64).share_memory_()

    def add(self, kind: str, detail: str = "", n: int = 1) -> None:
        """Count ``n`` skipped items of ``kind`` and warn."""
        if kind not in KINDS:
            kind = "other"
        row = min(_worker_slot(), self._table.shape[0] - 1)
        self._table[row, KINDS.index(kind)] += n
        warn_corrupt(kind, detail)

    def handler(self, exn: BaseException) -> bool:
        """A webdataset exception handler: count, warn, and continue with the next item."""
        self.add(classify(exn), " ".join(str(a) for a in getattr(exn, "args", ())[:3]) or repr(exn))
        return True

    def counts(self) -> dict[str, int]:
        """Skipped items per kind, summed over all processes of the loader."""
        totals = self._table.sum(dim=0).tolist()
        return dict(zip(KINDS, (int(v) for v in totals)))

    @property
    def total(self) -> int:
        return int(self._table.sum())

    def as_metrics(self, prefix: str = "data/corrupt_") -> dict[str, int]:
        """``{prefix + kind: count}`` plus ``{prefix + 'total': n}``, ready to log."""
        metrics = {prefix + k: v for k, v in self.counts().items()}
        metrics[prefix + "total"] = self.total
        return metrics

    def reset(self) -> None:
        self._table.zero_()


def make_counter(workers: int, counter: Optional[CorruptCounter] = None) -> CorruptCounter:
    """A counter with room for ``workers`` DataLoader workers (or ``counter`` if given)."""
    return counter if counter is not None else CorruptCounter(slots=workers + 1)
