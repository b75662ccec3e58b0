"""Make a model train only what a method trains: gps (selection + whole tensors), full, linear, bitfit."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from gps_ds.rules import ParamRoles, trainable_names


@dataclass
class Prepared:
    method: str
    whole: list[str]  # dense names trained whole
    selection: dict[str, torch.Tensor] | None = None
    mode: str | None = None  # "sparse" | "masked" for gps
    masked: object | None = None  # MaskedGradients, attached to the optimizer later
    stats: dict = field(default_factory=dict)


def prepare_model(model: nn.Module, roles: ParamRoles, method: str,
                  selection: dict[str, torch.Tensor] | None = None, mode: str = "sparse") -> Prepared:
    """Set `requires_grad` for `method`; for gps apply the selection in `mode` (in place)."""
    whole = trainable_names(roles, method)
    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.named_parameters())
    for n in whole:
        params[n].requires_grad_(True)
    prepared = Prepared(method, whole)
    if method != "gps":
        return prepared
    if selection is None:
        raise ValueError("method 'gps' needs a selection (run the scoring pass or set gps.mask)")
    prepared.selection, prepared.mode = selection, mode
    if mode == "sparse":
        from gps_ds.sparse import apply_sparse

        apply_sparse(model, selection)
    elif mode == "masked":
        from gps_ds.sparse import MaskedGradients

        for n in selection:
            params[n].requires_grad_(True)
        prepared.masked = MaskedGradients(model, selection)
    else:
        raise ValueError(f"unknown gps.mode '{mode}' (expected sparse or masked)")
    return prepared


def trainable_count(model: nn.Module, prepared: Prepared) -> dict[str, int]:
    """Trained parameter counts: selected entries, whole tensors, total."""
    params = dict(model.named_parameters())
    whole = sum(params[n].numel() for n in prepared.whole)
    selected = 0
    if prepared.selection is not None:
        selected = sum(int((idx >= 0).sum()) for idx in prepared.selection.values())
    return {"selected": selected, "whole": whole, "total": selected + whole}
