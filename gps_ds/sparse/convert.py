"""Turn selected nn.Linear / nn.Conv2d modules of a model into sparse ones and back.

The conversion swaps the class of the existing module object in place, so hooks, shared
references and parameter names are kept; ``weight`` and ``bias`` stay the same Parameter
objects.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from .autograd import gathered
from .indices import SelectionError, check_indices
from .modules import SparseConv2d, SparseLinear, _SparseWeight

# Subclasses whose forward is F.linear / F.conv2d in all but name.
_EQUIVALENT_SUBCLASSES = {"timm.layers.linear.Linear"}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _sparse_class(name: str, module: nn.Module, parent: nn.Module | None) -> type:
    if isinstance(module, _SparseWeight):
        raise SelectionError(f"{name}: module is already sparse; call merge_sparse() first")
    if isinstance(parent, nn.MultiheadAttention):
        raise SelectionError(
            f"{name}: nn.MultiheadAttention reads its out_proj weight directly; sparse mode cannot wrap it"
        )
    cls = type(module)
    if isinstance(module, nn.Linear):
        target, base = SparseLinear, nn.Linear
        overridden = cls.forward is not nn.Linear.forward
    elif isinstance(module, nn.Conv2d):
        target, base = SparseConv2d, nn.Conv2d
        overridden = cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward
        if module.padding_mode != "zeros":
            raise SelectionError(
                f"{name}: padding_mode={module.padding_mode!r} is not supported in sparse mode (only 'zeros')"
            )
    else:
        raise SelectionError(
            f"{name}: sparse mode supports the weight of nn.Linear or nn.Conv2d, not {cls.__name__}"
        )
    if overridden and _qualname(cls) not in _EQUIVALENT_SUBCLASSES:
        raise SelectionError(f"{name}: {_qualname(cls)} overrides forward(); sparse mode supports plain {base.__name__}")
    return target


def _refuse_zero3(name: str, param: Tensor, action: str) -> None:
    # Writes to a gathered ZeRO-3 parameter are not written back to its partitions.
    if hasattr(param, "ds_status") or hasattr(param, "ds_id"):
        raise RuntimeError(
            f"{name}: parameter is partitioned by DeepSpeed ZeRO-3; {action} before "
            "deepspeed.initialize() and outside deepspeed.zero.Init()"
        )


def _resolve(model: nn.Module, selection: Mapping[str, Tensor]) -> list[tuple[str, nn.Module, type, Tensor, Tensor | None]]:
    params = dict(model.named_parameters())
    plan = []
    for name, indices in selection.items():
        if name not in params:
            raise SelectionError(f"{name}: not a parameter of the model")
        prefix, _, leaf = name.rpartition(".")
        module = model.get_submodule(prefix)
        parent = model.get_submodule(prefix.rpartition(".")[0]) if prefix else None
        if leaf != "weight":
            raise SelectionError(f"{name}: only the 'weight' of nn.Linear / nn.Conv2d can be selected")
        target = _sparse_class(name, module, parent)
        weight = module.weight
        shape = tuple(getattr(weight, "ds_shape", None) or weight.shape)  # ZeRO-3 partitions: the full shape
        idx, valid = check_indices(name, indices, shape[0], int(torch.Size(shape[1:]).numel()))
        plan.append((name, module, target, idx, valid))
    return plan


def apply_sparse(
    model: nn.Module, selection: Mapping[str, Tensor], *, values_dtype: torch.dtype | None = None
) -> nn.Module:
    """Make every selected nn.Linear / nn.Conv2d sparse, in place; returns ``model``.

    ``selection`` maps weight names (as in ``model.named_parameters()``) to (rows, K)
    integer indices into the row flattened to fan_in (sorted, -1 = end-of-row padding).
    Everything is validated before the model is touched. ``values_dtype`` defaults to
    the weight's dtype.
    """
    resolved = _resolve(model, selection)
    for _name, module, target, idx, valid in resolved:
        base_class = type(module)
        module.__class__ = target
        module._gps_base_class = base_class
        module._sparsify(idx, valid, values_dtype)
    return model


def sparse_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(module name, module) for every SparseLinear / SparseConv2d in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _SparseWeight):
            yield name, module


def merged_weight(module: nn.Module) -> Tensor:
    """The dense effective weight of a sparse module (the plain weight for others)."""
    if isinstance(module, _SparseWeight):
        return module.merged_weight()
    return module.weight.detach()


def merge_sparse(model: nn.Module) -> nn.Module:
    """Turn every sparse module back into its original dense class, in place, with the
    merged weights (``weight`` gets its original requires_grad); returns ``model``."""
    modules = list(sparse_modules(model))
    for name, module in modules:
        _refuse_zero3(f"{name}.weight", module.weight, "call merge_sparse()")
    for _name, module in modules:
        merged = module.merged_weight()
        with torch.no_grad():
            module.weight.data.copy_(merged)
        module.weight.requires_grad_(getattr(module, "_gps_weight_requires_grad", True))
        del module.gps_values
        del module.gps_indices
        module._buffers.pop("gps_valid", None)
        for attr in ("_gps_plan", "_gps_weight_requires_grad"):
            module.__dict__.pop(attr, None)
        module.__class__ = module.__dict__.pop("_gps_base_class", None) or (
            nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
        )
    return model


def sparse_values(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """{weight name: (indices int32 (rows, K) with -1 padding, values fp32 (rows, K))}.

    Detached copies; padded slots hold value 0.
    """
    out = {}
    for name, module in sparse_modules(model):
        key = f"{name}.weight" if name else "weight"
        with gathered(module.gps_values):
            values = module.gps_values.detach().to(torch.float32, copy=True)
        out[key] = (module.gps_indices.to(torch.int32, copy=True), values)
    return out
