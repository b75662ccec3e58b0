"""The fused CPU gather kernel (``csrc/fused_gather.c``), compiled at first use and called through ctypes.

The pure-torch gather path makes three passes over a gathered (positions x K x rows)
temporary (``index_select``, ``mul_``, ``sum``); the C loop makes one pass over the output
gradient with the input row in L1 and was 2-3x faster on ViT-S/ViT-B layer shapes
(docs/sparse-kernels.md). It needs no torch headers, so a plain C compiler builds it in well
under a second; the shared library is cached per (source, compiler, flags, machine) under
``$GPS_DS_KERNEL_CACHE`` (default ``~/.cache/gps-ds/kernels``), written to a temporary name and
renamed, so ranks starting together on one node do not see half-written files. Without a
compiler ``available()`` is False with the reason in ``unavailable_reason()``, and "auto"
kernel choice keeps the torch paths. ctypes releases the GIL during the call, so
``cpu_threads`` can run position ranges side by side.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "fused_gather.c"
ABI = 2
_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}  # "lib" or "error", filled by the first load()


class NativeUnavailable(RuntimeError):
    """The fused kernel could not be built or loaded; the message says why."""


def cache_dir() -> Path:
    if os.environ.get("GPS_DS_KERNEL_CACHE"):
        return Path(os.environ["GPS_DS_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gps-ds" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_flags() -> list[str]:
    """-O3, plus AVX2/FMA where this CPU has them. Not -march=native: a cached library must
    also run on the other nodes of a cluster that share the home directory."""
    flags = ["-O3", "-std=c99", "-fPIC", "-shared"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma"]
    return flags


def _compiler_version(cc: str) -> str:
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"C compiler {cc!r} does not run ({exc}); set CC") from None
    return done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else ""


def library_path(cc: str) -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cc.encode(), _compiler_version(cc).encode(),
                 " ".join(compile_flags()).encode(), platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"fused_gather-{key.hexdigest()[:16]}.so"


def build(cc: str, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise NativeUnavailable(f"cannot create the kernel cache {target.parent} ({exc}); set GPS_DS_KERNEL_CACHE")
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, *compile_flags(), "-o", tmp, str(SOURCE)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            raise NativeUnavailable(f"compiling {SOURCE.name} failed to start ({exc})") from None
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no output"])[0]
            raise NativeUnavailable(f"compiling {SOURCE.name} with {cc} failed: {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.gps_fused_gather_abi() != ABI:
        raise OSError(f"{path} has another ABI version")
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in ("gps_fused_gather_f32", "gps_fused_gather_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr]
        fn.restype = None
    return lib


def load() -> ctypes.CDLL:
    """The loaded library, building it on first use; raises NativeUnavailable with the reason."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        if "error" in _state:
            raise NativeUnavailable(_state["error"])
        try:
            if os.environ.get("GPS_DS_NO_NATIVE", "0") not in ("", "0"):
                raise NativeUnavailable("disabled by GPS_DS_NO_NATIVE")
            cc = _compiler()
            if cc is None:
                raise NativeUnavailable("no C compiler found (cc, gcc or clang on PATH, or set CC)")
            path = library_path(cc)
            if not path.exists():
                build(cc, path)
            try:
                lib = _open(path)
            except OSError:  # a damaged or foreign file under our name: build it again once
                build(cc, path)
                lib = _open(path)
        except (NativeUnavailable, OSError) as exc:
            _state["error"] = str(exc)
            _log.warning("gps-ds: fused CPU gather kernel unavailable (%s); using the torch kernels", exc)
            raise NativeUnavailable(str(exc)) from None
        _state["lib"] = lib
        return lib


def available() -> bool:
    try:
        load()
    except NativeUnavailable:
        return False
    return True


def unavailable_reason() -> str | None:
    return None if available() else _state.get("error")


def reset() -> None:
    """Forget the loaded library or the failure (tests; after changing CC or the cache folder)."""
    with _lock:
        _state.clear()


def supports(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def fused_gather_into(
    out: Tensor, x2: Tensor, g2: Tensor, idx_t: Tensor, m0: int, m1: int, bias: Tensor | None = None
) -> None:
    """out (K, R) += sum over positions [m0, m1) of x2[m, idx_t[k, r]] * g2[m, r]; with ``bias``
    (R,) also bias += the sum of those rows of g2 (the bias gradient, in the same pass).

    ``x2`` (M, C) and ``g2`` (M, R) share a dtype (float32/float64) with unit column stride;
    ``idx_t`` is a contiguous (K, R) int32 tensor of columns in [0, C); ``out``/``bias`` are
    contiguous.
    """
    k, r = idx_t.shape
    lib = load()
    fn = lib.gps_fused_gather_f64 if out.dtype == torch.float64 else lib.gps_fused_gather_f32
    tmp = torch.empty(k, r, dtype=out.dtype)
    btmp = None if bias is None else torch.empty(r, dtype=out.dtype)
    fn(x2.data_ptr(), x2.stride(0), g2.data_ptr(), g2.stride(0), idx_t.data_ptr(), r, k, m0, m1,
       out.data_ptr(), tmp.data_ptr(), None if bias is None else bias.data_ptr(),
       None if btmp is None else btmp.data_ptr())
