"""Delta files: what one task changed, as indices + values plus the tensors trained whole.

Layout (safetensors, metadata `format=gps-delta/1`):
  `<param>::indices`  int32 (rows, K), selected columns of the row flattened to fan_in
                      (ascending; -1 pads rows of variable-count schemes)
  `<param>::values`   fp32 (rows, K), the trained weights themselves at those entries
  `<param>`           fp32, every tensor trained whole (biases, head, layer scales, ...)
Metadata also holds the base model name, its fingerprint (candidate names and shapes), the
method and K. A delta merges into a plain dense checkpoint (`merge_state_dict`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from gps_ds.selection.maskfile import _atomic_write, _serialize

DELTA_FORMAT = "gps-delta/1"
IDX, VAL = "::indices", "::values"


class DeltaError(ValueError):
    pass


@dataclass
class Delta:
    selected: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (indices, values)
    whole: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)

    def num_selected(self) -> int:
        return sum(int((idx >= 0).sum()) for idx, _ in self.selected.values())

    def num_whole(self) -> int:
        return sum(t.numel() for t in self.whole.values())


def _flat_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def gather_selected(weight: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Values of a dense weight at (rows, K) indices; padded (-1) slots read as 0 (on the weight's
    device: a CPU selection with the weight on an accelerator, as in masked mode, is moved)."""
    idx = indices.long().to(weight.device)
    valid = idx >= 0
    vals = torch.gather(_flat_rows(weight.detach()).float(), 1, idx.clamp(min=0))
    return vals.masked_fill(~valid, 0.0)


def scatter_selected(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of `weight` with the selected entries replaced by `values` (padding ignored)."""
    flat = _flat_rows(weight.detach()).clone()
    idx = indices.long().to(flat.device)
    valid = idx >= 0
    rows = torch.arange(idx.shape[0], device=flat.device).unsqueeze(1).expand_as(idx)
    flat[rows[valid], idx[valid]] = values.to(flat.device)[valid].to(flat.dtype)
    return flat.reshape(weight.shape)


def extract_delta(model: nn.Module, whole_names: list[str], selection: Mapping[str, torch.Tensor] | None = None,
                  meta: Mapping[str, str] | None = None) -> Delta:
    """Read the trained state of `model`: sparse modules give their (indices, values); in masked
    mode (dense weights) pass the `selection` to gather the values from the dense weights."""
    delta = Delta(meta=dict(meta or {}))
    for mod_name, module in model.named_modules():
        if hasattr(module, "gps_values") and hasattr(module, "gps_indices"):
            name = f"{mod_name}.weight" if mod_name else "weight"
            idx = module.gps_indices.detach().clone()
            vals = module.gps_values.detach().float().clone()
            valid = getattr(module, "gps_valid", None)
            if valid is not None:
                idx = idx.masked_fill(~valid.bool(), -1)
                vals = vals.masked_fill(~valid.bool(), 0.0)
            delta.selected[name] = (idx.to(torch.int32), vals)
    if selection is not None:
        params = dict(model.named_parameters())
        for name, idx in selection.items():
            if name in delta.selected:
                continue
            delta.selected[name] = (idx.to(torch.int32).clone(), gather_selected(params[name], idx))
    params = dict(model.named_parameters())
    for name in whole_names:
        delta.whole[name] = params[name].detach().float().clone()
    return delta


def save_delta(path: str | os.PathLike, delta: Delta) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, (idx, vals) in delta.selected.items():
        tensors[name + IDX] = idx.to(torch.int32).contiguous()
        tensors[name + VAL] = vals.float().contiguous()
    for name, t in delta.whole.items():
        tensors[name] = t.float().contiguous()
    meta = {k: str(v) for k, v in delta.meta.items()}
    meta["format"] = DELTA_FORMAT
    _atomic_write(path, _serialize(tensors, meta))


def load_delta(path: str | os.PathLike) -> Delta:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise DeltaError(f"delta file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DeltaError(f"delta file {path} is unreadable or truncated: {str(err).splitlines()[0]}") from None
    if meta.get("format") != DELTA_FORMAT:
        raise DeltaError(f"{path} is not a gps-ds delta file (format {meta.get('format')!r}, expected {DELTA_FORMAT})")
    delta = Delta(meta=meta)
    for key, t in tensors.items():
        if key.endswith(IDX):
            name = key[: -len(IDX)]
            if name + VAL not in tensors:
                raise DeltaError(f"delta file {path}: '{name}' has indices but no values")
            delta.selected[name] = (t, tensors[name + VAL])
            _check_selected(path, name, t, tensors[name + VAL])
        elif key.endswith(VAL):
            if key[: -len(VAL)] + IDX not in tensors:
                raise DeltaError(f"delta file {path}: '{key[: -len(VAL)]}' has values but no indices")
        else:
            if not t.is_floating_point():
                raise DeltaError(f"delta file {path}: tensor '{key}' is {t.dtype}, expected floating point")
            delta.whole[key] = t
    return delta


def _check_selected(path: Path, name: str, idx: torch.Tensor, vals: torch.Tensor) -> None:
    """One selected tensor's indices and values as the format says: int32 (rows, K) in [-1, ...),
    no index twice in a row, values floating point of the same shape."""
    where = f"delta file {path}: '{name}'"
    if idx.dtype != torch.int32 or idx.dim() != 2:
        raise DeltaError(f"{where}: indices are {idx.dtype} {tuple(idx.shape)}, expected int32 (rows, K)")
    if not vals.is_floating_point() or vals.shape != idx.shape:
        raise DeltaError(f"{where}: values are {vals.dtype} {tuple(vals.shape)}, expected floating point "
                         f"{tuple(idx.shape)} like the indices")
    if idx.numel() == 0:
        return
    if int(idx.min()) < -1:
        raise DeltaError(f"{where}: negative index {int(idx.min())} (only -1 pads a row)")
    s = idx.sort(dim=1).values
    if ((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).any():
        raise DeltaError(f"{where}: an index appears twice in a row")


def check_delta_fits(delta: Delta, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise DeltaError naming the first tensor of `delta` that does not fit `shapes`."""
    for name, (idx, vals) in delta.selected.items():
        if name not in shapes:
            raise DeltaError(f"delta parameter '{name}' is not in the model")
        shape = shapes[name]
        fan_in = math.prod(shape[1:])
        if idx.shape[0] != shape[0] or idx.shape != vals.shape:
            raise DeltaError(f"delta parameter '{name}': indices {tuple(idx.shape)} do not fit the model's {shape}")
        if idx.numel() and int(idx.max()) >= fan_in:
            raise DeltaError(f"delta parameter '{name}': index {int(idx.max())} >= fan_in {fan_in}")
    for name, t in delta.whole.items():
        if name not in shapes:
            raise DeltaError(f"delta parameter '{name}' is not in the model")
        if tuple(t.shape) != tuple(shapes[name]):
            raise DeltaError(f"delta parameter '{name}' has shape {tuple(t.shape)}, the model has {tuple(shapes[name])}")


def merge_state_dict(state: Mapping[str, torch.Tensor], delta: Delta, head: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A dense state dict: `state` with the delta's selected entries and whole tensors applied.
    Head tensors (names in `head`, or absent from `state`) may change shape: the task head."""
    head = set(head or [])
    body = Delta(delta.selected, {n: t for n, t in delta.whole.items() if n not in head})
    check_delta_fits(body, {n: tuple(t.shape) for n, t in state.items()})
    out = dict(state)
    for name, (idx, vals) in delta.selected.items():
        out[name] = scatter_selected(state[name], idx, vals).to(state[name].dtype)
    for name, t in delta.whole.items():
        out[name] = t.to(state[name].dtype) if name in body.whole else t.clone()
    return out


def load_delta_into_model(model: nn.Module, delta: Delta) -> None:
    """Write the delta into a dense model in place (for evaluation); refuses a misfit first."""
    params = dict(model.named_parameters())
    check_delta_fits(delta, {n: tuple(p.shape) for n, p in params.items()})
    with torch.no_grad():
        for name, (idx, vals) in delta.selected.items():
            params[name].copy_(scatter_selected(params[name], idx, vals))
        for name, t in delta.whole.items():
            params[name].copy_(t)


def describe(delta: Delta) -> dict:
    per_block: dict[str, int] = {}
    for name, (idx, _) in delta.selected.items():
        block = ".".join(name.split(".")[:2])
        per_block[block] = per_block.get(block, 0) + int((idx >= 0).sum())
    return {
        "selected": delta.num_selected(), "whole": delta.num_whole(),
        "total": delta.num_selected() + delta.num_whole(), "tensors_selected": len(delta.selected),
        "tensors_whole": len(delta.whole), "per_block": per_block,
        "meta": {k: v for k, v in delta.meta.items()},
    }


def meta_json(obj) -> str:
    return json.dumps(obj, sort_keys=True)
