"""Mask and score files (safetensors), parameter fingerprints, fit checks.

Mask file (contract, see DESIGN.md)
-----------------------------------
A safetensors file with one int32 tensor per candidate parameter, named exactly
as in ``model.named_parameters()``, shape ``(rows, K)``, holding the selected
column indices of each row flattened to ``fan_in`` (``in*kh*kw`` for Conv),
every row sorted ascending.  Schemes whose count varies per row pad each row at
the end with ``-1`` ("no entry").  Metadata (all strings): ``format=gps-mask/1``,
``k``, ``scheme``, ``loss``, ``model``, ``samples``, ``fingerprint``
(:func:`param_fingerprint` of the model's parameters).

Score file: one fp32 tensor per candidate, parameter names and shapes, metadata
``format=gps-scores/1``.

Both are written by this module's own small serializer (byte-for-byte the
safetensors layout: u64 little-endian header length, JSON header padded with
spaces to a multiple of 8, then the tensors' bytes back to back).  It orders
metadata keys and tensor names, so the same input always gives the same bytes
(the safetensors library writes its metadata map in a per-process random order).
Writes go to a temporary file in the target folder, then ``os.replace``: a
reader never sees a half-written file.  Reading uses the safetensors library;
any problem with the file becomes a :class:`MaskFileError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from typing import Any, Mapping, Union

import numpy as np
import torch

__all__ = [
    "MASK_FORMAT",
    "SCORES_FORMAT",
    "MaskFileError",
    "MaskMismatchError",
    "named_shapes_of",
    "param_fingerprint",
    "save_mask",
    "load_mask",
    "save_scores",
    "load_scores",
    "check_fits",
    "check_mask_model",
    "selection_stats",
]

MASK_FORMAT = "gps-mask/1"
SCORES_FORMAT = "gps-scores/1"
_MASK_KEYS = ("k", "scheme", "loss", "model", "samples", "fingerprint")


class MaskFileError(ValueError):
    """A mask/score file cannot be read or is not in the expected format."""


class MaskMismatchError(ValueError):
    """A selection does not fit a model; the message names the first bad parameter."""


NamedShapes = Mapping[str, tuple]


# --------------------------------------------------------------------------- shapes


def named_shapes_of(model_or_named_shapes: Union[torch.nn.Module, NamedShapes]) -> dict[str, tuple]:
    """``{name: shape}`` of a module's parameters (ZeRO-3 aware) or of a given mapping."""
    if isinstance(model_or_named_shapes, torch.nn.Module):
        out: dict[str, tuple] = {}
        for name, p in model_or_named_shapes.named_parameters():
            shape = getattr(p, "ds_shape", None)  # ZeRO-3 partitioned params keep it here
            out[name] = tuple(int(d) for d in (shape if shape is not None else p.shape))
        return out
    return {n: tuple(int(d) for d in s) for n, s in model_or_named_shapes.items()}


def param_fingerprint(named_shapes: NamedShapes) -> str:
    """Short hex (16 chars) sha256 of the sorted lines ``name:d0,d1,...``."""
    lines = sorted(f"{n}:{','.join(str(int(d)) for d in s)}" for n, s in named_shapes.items())
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- writing

_DTYPES = {torch.int32: ("I32", "<i4"), torch.float32: ("F32", "<f4")}


def _serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        tag, np_dtype = _DTYPES[t.dtype]
        data = t.detach().to("cpu").contiguous().numpy().astype(np_dtype, copy=False).tobytes()
        header[name] = {
            "dtype": tag,
            "shape": [int(d) for d in t.shape],
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def _atomic_write(path: Union[str, os.PathLike], payload: bytes) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_mask(
    path: Union[str, os.PathLike],
    selection: Mapping[str, torch.Tensor],
    *,
    k: int,
    scheme: str,
    loss: str,
    model: str,
    samples: int,
    fingerprint: str,
) -> None:
    """Write a selection as a gps-mask/1 file (int32 (rows, K) per parameter)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, idx in selection.items():
        if idx.dim() != 2:
            raise ValueError(f"selection for {name!r} must be 2-D (rows, K), got {tuple(idx.shape)}")
        if idx.is_floating_point() or idx.dtype == torch.bool or idx.is_complex():
            raise ValueError(f"selection for {name!r} must hold integer indices, got {idx.dtype}")
        if idx.numel() and (int(idx.max()) >= 2**31 or int(idx.min()) < -1):
            raise ValueError(f"selection for {name!r} holds indices outside [-1, 2**31)")
        tensors[name] = idx.to(torch.int32)
    metadata = {
        "format": MASK_FORMAT,
        "k": str(int(k)),
        "scheme": str(scheme),
        "loss": str(loss),
        "model": str(model),
        "samples": str(int(samples)),
        "fingerprint": str(fingerprint),
    }
    _atomic_write(path, _serialize(tensors, metadata))


def save_scores(path: Union[str, os.PathLike], scores: Mapping[str, torch.Tensor]) -> None:
    """Write fp32 scores (parameter names and shapes) as a gps-scores/1 file."""
    tensors = {n: s.detach().to(torch.float32) for n, s in scores.items()}
    _atomic_write(path, _serialize(tensors, {"format": SCORES_FORMAT}))


# --------------------------------------------------------------------------- reading


def _read(path: Union[str, os.PathLike], expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    p = os.fspath(path)
    if os.path.isdir(p):
        raise MaskFileError(f"{p}: is a directory, not a safetensors file")
    try:
        from safetensors import safe_open

        with safe_open(p, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            names = list(f.keys())
            tensors = {n: f.get_tensor(n).clone() for n in names}
    except FileNotFoundError:
        raise MaskFileError(f"{p}: no such file") from None
    except Exception as e:  # safetensors raises SafetensorError/OSError/...; keep one clear message
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MaskFileError(f"{p}: not a readable safetensors file ({msg})") from None
    fmt = metadata.get("format")
    if fmt != expected_format:
        raise MaskFileError(f"{p}: metadata format is {fmt!r}, expected {expected_format!r}")
    return tensors, metadata


def load_mask(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a gps-mask/1 file -> (selection as int64 (rows, K) tensors, metadata).

    ``metadata`` holds the file's strings, with ``k`` and ``samples`` as ints.
    """
    p = os.fspath(path)
    tensors, metadata = _read(p, MASK_FORMAT)
    missing = [key for key in _MASK_KEYS if key not in metadata]
    if missing:
        raise MaskFileError(f"{p}: metadata lacks {', '.join(missing)}")
    meta: dict[str, Any] = dict(metadata)
    for key in ("k", "samples"):
        try:
            meta[key] = int(metadata[key])
        except ValueError:
            raise MaskFileError(f"{p}: metadata {key}={metadata[key]!r} is not an integer") from None
    selection: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if t.dtype != torch.int32 or t.dim() != 2:
            raise MaskFileError(
                f"{p}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected int32 (rows, K)"
            )
        bad = _first_bad_row(t)
        if bad is not None:
            row, why = bad
            raise MaskFileError(f"{p}: tensor {name!r} row {row}: {why} (each row holds ascending distinct "
                                f"indices >= 0, then -1 padding)")
        selection[name] = t.to(torch.int64)
    if meta["k"] < 1:
        raise MaskFileError(f"{p}: metadata k={meta['k']} is not a positive integer")
    return selection, meta


def _first_bad_row(idx: torch.Tensor) -> tuple[int, str] | None:
    """The first row breaking the contract (ascending, distinct, -1 only as trailing padding)."""
    if idx.numel() == 0:
        return None
    t = idx.to(torch.int64)
    below = (t < -1).any(dim=1)
    valid = t >= 0
    # padding then a valid entry again: a -1 followed by something >= 0
    gap = (~valid[:, :-1] & valid[:, 1:]).any(dim=1) if t.shape[1] > 1 else torch.zeros_like(below)
    d = t[:, 1:] - t[:, :-1]
    both = valid[:, 1:] & valid[:, :-1]
    dup = ((d == 0) & both).any(dim=1)
    down = ((d < 0) & both).any(dim=1)
    for flags, why in ((below, "index below -1"), (gap, "-1 padding before a selected index"),
                       (dup, "duplicate index"), (down, "indices not in ascending order")):
        rows = torch.nonzero(flags).flatten()
        if rows.numel():
            r = int(rows[0])
            return r, f"{why} in {t[r, :8].tolist()}{' ...' if t.shape[1] > 8 else ''}"
    return None


def check_mask_model(path: Union[str, os.PathLike], meta: Mapping[str, Any], fingerprint: str) -> None:
    """Refuse a mask written for another model (its metadata fingerprint is not this model's)."""
    theirs = meta.get("fingerprint")
    if theirs != fingerprint:
        raise MaskMismatchError(f"{os.fspath(path)}: the mask was selected on model {meta.get('model')!r} with "
                                f"candidate fingerprint {theirs!r}; this config's model has {fingerprint!r}")


def load_scores(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read a gps-scores/1 file -> ``{name: fp32 tensor}``."""
    tensors, _ = _read(path, SCORES_FORMAT)
    return tensors


# --------------------------------------------------------------------------- checks


def check_fits(
    selection: Mapping[str, torch.Tensor],
    model_or_named_shapes: Union[torch.nn.Module, NamedShapes],
) -> None:
    """Raise :class:`MaskMismatchError` unless every selected tensor fits the model.

    Checks, per parameter in the selection's order: the name exists, it has >= 2
    dimensions, the row count matches, every index is in ``[-1, fan_in)``
    (``-1`` = padding).  The message names the first parameter that fails.
    """
    shapes = named_shapes_of(model_or_named_shapes)
    for name, idx in selection.items():
        if name not in shapes:
            raise MaskMismatchError(f"parameter {name!r} in the selection is missing in the model")
        shape = shapes[name]
        if len(shape) < 2:
            raise MaskMismatchError(
                f"parameter {name!r} has shape {shape}: not a candidate weight (needs >= 2 dims)"
            )
        rows = shape[0]
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        if idx.dim() != 2 or idx.shape[0] != rows:
            raise MaskMismatchError(
                f"parameter {name!r}: selection has shape {tuple(idx.shape)}, "
                f"the model has {rows} rows (shape {shape})"
            )
        if idx.numel():
            hi, lo = int(idx.max()), int(idx.min())
            if hi >= fan_in:
                raise MaskMismatchError(
                    f"parameter {name!r}: selected index {hi} >= fan_in {fan_in} (shape {shape})"
                )
            if lo < -1:
                raise MaskMismatchError(f"parameter {name!r}: negative selected index {lo}")


def _block_of(name: str) -> str:
    return ".".join(name.split(".")[:2])


def selection_stats(
    selection: Mapping[str, torch.Tensor], named_shapes: NamedShapes | None = None
) -> dict[str, Any]:
    """Counts for inspection/plotting.

    Returns ``{"total": n, "per_tensor": {name: {"selected", "rows", "numel",
    "fraction"}}, "per_block": {block: n}}`` where a block is the first two name
    components ("blocks.3", "patch_embed.proj").  ``-1`` padding is not counted;
    ``numel``/``fraction`` are None when ``named_shapes`` is not given.
    """
    shapes = named_shapes_of(named_shapes) if named_shapes is not None else {}
    per_tensor: dict[str, dict[str, Any]] = {}
    per_block: dict[str, int] = {}
    total = 0
    for name, idx in selection.items():
        n = int((idx >= 0).sum())
        shape = shapes.get(name)
        numel = int(np.prod(shape)) if shape is not None else None
        per_tensor[name] = {
            "selected": n,
            "rows": int(idx.shape[0]) if idx.dim() else 0,
            "numel": numel,
            "fraction": (n / numel) if numel else None,
        }
        block = _block_of(name)
        per_block[block] = per_block.get(block, 0) + n
        total += n
    cand = sum(v["numel"] for v in per_tensor.values() if v["numel"] is not None)
    return {
        "total": total,
        "candidate_numel": cand if shapes else None,
        "per_tensor": per_tensor,
        "per_block": per_block,
    }
