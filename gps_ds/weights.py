"""Reading and writing plain weight files safely: safetensors, or torch.load(weights_only=True)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class WeightsError(ValueError):
    pass


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from .safetensors or .pth/.pt/.bin (never unpickling code).
    Common wrappers ({"model": ...}, {"state_dict": ...}) are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to parse is a bad file for the user
        raise WeightsError(f"checkpoint {path} is unreadable or corrupt: {str(err).splitlines()[0][:200]}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"checkpoint {path} does not hold a name -> tensor state dict")
    return state


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a .safetensors file atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# -- bounded memory: safetensors read and written one tensor at a time (no mmap, no whole dict) ------

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class SafetensorsReader:
    """Tensors of a .safetensors file read one at a time with plain file reads (only the tensor asked
    for is in memory; a memory map would count every page touched in the process's RSS)."""

    def __init__(self, path: str | os.PathLike) -> None:
        import json
        import struct

        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
            (size,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(size))
            self._start = 8 + size
            self.metadata = header.pop("__metadata__", None) or {}
            self.entries = {k: (_ST_DTYPES[v["dtype"]], tuple(v["shape"]), tuple(v["data_offsets"])) for k, v in header.items()}
        except (OSError, ValueError, KeyError, struct.error) as err:
            raise WeightsError(f"checkpoint {self.path} is unreadable or corrupt: {str(err).splitlines()[0][:200]}") from None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, (begin, end) = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        buf = out.view(-1).view(torch.uint8) if out.numel() else out.view(torch.uint8)
        self._file.seek(self._start + begin)
        if self._file.readinto(memoryview(buf.numpy())) != end - begin:
            raise WeightsError(f"checkpoint {self.path} is truncated at '{name}'")
        return out

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) along the first dimension (one contiguous byte range of the file)."""
        dtype, shape, (begin, end) = self.entries[name]
        if not shape:
            return self.get(name)
        r0, r1 = max(0, r0), min(shape[0], r1)
        out = torch.empty((max(0, r1 - r0), *shape[1:]), dtype=dtype)
        if out.numel():
            row = (end - begin) // shape[0]
            self._file.seek(self._start + begin + r0 * row)
            if self._file.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != (r1 - r0) * row:
                raise WeightsError(f"checkpoint {self.path} is truncated at '{name}'")
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_streaming(path: str | os.PathLike, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], produce,
                   metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file whose tensors (name -> (dtype, shape) in `specs`) come one at a time
    from `produce(name)`: at most one tensor in memory. Atomic (temporary file, then rename)."""
    import json
    import math
    import struct

    header: dict = {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, (dtype, shape) in specs.items():
                t = produce(name)
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise WeightsError(f"'{name}': produced {t.dtype} {tuple(t.shape)}, declared {dtype} {tuple(shape)}")
                t = t.detach().cpu().contiguous()
                f.write(memoryview((t.view(-1) if t.dim() else t.reshape(1)).view(torch.uint8).numpy()))
                del t
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def merge_streaming(base: str | os.PathLike, delta, head: list[str], out: str | os.PathLike) -> int:
    """`gps_ds.delta.merge_state_dict` for a .safetensors base, one tensor in memory at a time
    (the delta itself is small); returns the number of tensors written. Same result, same checks."""
    from gps_ds.delta import Delta, check_delta_fits, scatter_selected

    with SafetensorsReader(base) as src:
        heads = set(head or [])
        body = Delta(delta.selected, {n: t for n, t in delta.whole.items() if n not in heads})
        check_delta_fits(body, {n: src.shape(n) for n in src.keys()})
        specs = {n: (src.dtype(n), src.shape(n)) for n in src.keys()}
        for n, t in delta.whole.items():
            if n not in body.whole:  # a head of another shape (or one the base lacks): the delta's tensor
                specs[n] = (t.dtype, tuple(t.shape))

        def produce(name: str) -> torch.Tensor:
            if name in delta.selected:
                idx, vals = delta.selected[name]
                w = src.get(name)
                return scatter_selected(w, idx, vals).to(w.dtype)
            if name in body.whole:
                return delta.whole[name].to(specs[name][0])
            if name in delta.whole:
                return delta.whole[name].clone()
            return src.get(name)

        save_streaming(out, specs, produce)
    return len(specs)
