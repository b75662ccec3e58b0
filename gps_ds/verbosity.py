"""How much DeepSpeed and torch may say: quiet by default, everything with `gps-ds --verbose`.

Quiet drops DeepSpeed's start-up chatter below ERROR (the "Setting accelerator to CPU" warning,
engine INFO dumps), torch's C++-extension notes ("No CUDA runtime is found") and the op-build
prints of `deepspeed.init_distributed`. Errors always show. `GPS_DS_VERBOSE=1` (inherited by the
ranks a launcher starts) is the same as `--verbose`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from typing import Iterator

ENV = "GPS_DS_VERBOSE"
_QUIET_LOGGERS = ("DeepSpeed", "torch.utils.cpp_extension")


def is_verbose() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


class _BelowError(logging.Filter):
    """Keeps ERROR and above unless verbose (checked per record: the flag may change later)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or is_verbose()


_FILTER = _BelowError()


def configure(verbose: bool | None = None) -> None:
    """Install the filters (idempotent); `verbose=True` also sets GPS_DS_VERBOSE for child
    processes and lets DeepSpeed log at INFO (its engine configuration dumps)."""
    if verbose:
        os.environ[ENV] = "1"
    for name in _QUIET_LOGGERS:
        # A filter on the logger object itself: DeepSpeed's logger factory later resets the
        # level and adds a handler to this same object, but keeps its filters.
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    if is_verbose():
        with contextlib.redirect_stdout(sys.stderr):  # its handler takes sys.stdout: results stay alone there
            import deepspeed.utils.logging as ds_logging  # creates DeepSpeed's logger now, to set its level

        ds_logging.logger.setLevel(logging.INFO)
        for handler in ds_logging.logger.handlers:
            handler.setLevel(logging.INFO)


@contextlib.contextmanager
def quiet_prints() -> Iterator[None]:
    """Python-level prints (DeepSpeed's "op built successfully") swallowed unless verbose."""
    if is_verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
