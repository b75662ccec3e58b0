"""Fine-tuning methods, one module each, behind `gps_ds.methods.base.Method`."""

from __future__ import annotations

import torch
import torch.nn as nn

from gps_ds.methods import gps as _gps  # noqa: F401  (registers)
from gps_ds.methods import simple as _simple  # noqa: F401  (registers)
from gps_ds.methods import lora as _lora  # noqa: F401  (registers)
from gps_ds.methods import adapter as _adapter  # noqa: F401  (registers)
from gps_ds.methods import vpt as _vpt  # noqa: F401  (registers)
from gps_ds.methods import ssf as _ssf  # noqa: F401  (registers)
from gps_ds.methods.base import (METHODS, Method, MethodError, Prepared, get_method, method_names,
                                 register_method, set_trainable)
from gps_ds.rules import ParamRoles

__all__ = ["METHODS", "Method", "MethodError", "Prepared", "get_method", "method_names", "register_method",
           "set_trainable", "prepare_model", "trainable_count"]


def prepare_model(model: nn.Module, roles: ParamRoles, method: str,
                  selection: dict[str, torch.Tensor] | None = None, mode: str = "sparse",
                  options: dict | None = None) -> Prepared:
    """Make `model` train what `method` trains (in place)."""
    return get_method(method, options).prepare(model, roles, selection, mode)


def trainable_count(model: nn.Module, prepared: Prepared) -> dict[str, int]:
    return (prepared.impl or get_method(prepared.method)).count(model, prepared)
