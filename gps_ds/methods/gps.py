"""GPS: the selected (rows, K) entries of every candidate weight, plus biases and the head."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from gps_ds.delta import Delta, extract_delta
from gps_ds.methods.base import Method, MethodError, Prepared, register_method, set_trainable
from gps_ds.rules import ParamRoles


@register_method
class GPS(Method):
    name = "gps"
    needs_selection = True

    def trainable_whole(self, roles: ParamRoles) -> list[str]:
        return roles.whole

    def prepare(self, model: nn.Module, roles: ParamRoles, selection: dict[str, torch.Tensor] | None = None,
                mode: str = "sparse") -> Prepared:
        if selection is None:
            raise MethodError("method 'gps' needs a selection (run the scoring pass or set gps.mask)")
        whole = self.trainable_whole(roles)
        set_trainable(model, whole)
        prepared = Prepared(self.name, whole, selection=selection, mode=mode, impl=self)
        if mode == "sparse":
            from gps_ds.sparse import apply_sparse

            apply_sparse(model, selection)  # the (rows, K) values become the trainable parameters
        elif mode == "masked":
            from gps_ds.sparse import MaskedGradients

            params = dict(model.named_parameters())
            for n in selection:
                params[n].requires_grad_(True)
            prepared.masked = MaskedGradients(model, selection)
        else:
            raise MethodError(f"unknown gps.mode '{mode}' (expected sparse or masked)")
        return prepared

    def extract(self, model: nn.Module, prepared: Prepared, meta: Mapping[str, Any]) -> Delta:
        # Sparse modules carry their own indices and values; masked mode reads the dense weights.
        return extract_delta(model, prepared.whole, prepared.selection if prepared.mode == "masked" else None, meta)

    def load_trained(self, model: nn.Module, prepared: Prepared, delta: Delta) -> None:
        from gps_ds.delta import scatter_selected

        super().load_trained(model, prepared, delta)
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, (idx, vals) in delta.selected.items():
                module = modules.get(name.rsplit(".", 1)[0] if "." in name else "")
                if module is not None and hasattr(module, "gps_values"):  # sparse mode
                    valid = idx >= 0
                    module.gps_values.copy_(torch.where(valid.to(vals.device), vals, 0).to(module.gps_values))
                else:  # masked mode: the dense weight
                    params[name].copy_(scatter_selected(params[name], idx, vals))
