"""gps-ds: GPS (Gradient-based Parameter Selection) fine-tuning as a DeepSpeed plugin."""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _prefer_environment_ninja() -> None:
    """Put this interpreter's bin folder first on PATH when it holds `ninja`, as activating the
    environment would. DeepSpeed JIT-builds its CPU ops (shm comm, Adam) with whichever `ninja`
    is on PATH, into one shared cache folder; two ninja versions (the environment's and the
    system's) read each other's build logs as stale, so every launch that found the other one
    rebuilt the op (about a minute of two cores each time, seen while tests ran with and without
    the environment activated)."""
    bindir = _os.path.dirname(_sys.executable)
    path = _os.environ.get("PATH", "")
    if _os.path.isfile(_os.path.join(bindir, "ninja")) and path.split(_os.pathsep)[0] != bindir:
        _os.environ["PATH"] = bindir + _os.pathsep + path


_prefer_environment_ninja()
