"""SSF, Scaling & Shifting your Features (Lian et al., NeurIPS 2022).

After every Linear, Conv2d and normalisation layer of the backbone (the head excluded), the output
channels are scaled and shifted: y -> gamma * y + beta, gamma = 1 and beta = 0 at the start. The
two vectors are registered on the layer itself (`<layer>.ssf_scale`, `<layer>.ssf_shift`; every
base parameter keeps its name) and applied by a forward hook on that layer. Since the layer before
is affine in its output channels, merging is exact: W' = gamma * W (row / output channel wise),
b' = gamma * b + beta; for a norm the same on its affine weight and bias. The merged checkpoint is
a plain timm state dict. So that every wrapped layer merges, a layer without a bias (Swin's
patch-merging `reduction`, `qkv_bias=False` ViTs) gets the scale only, and a norm without an affine
gets neither.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from gps_ds.delta import Delta, merge_state_dict
from gps_ds.methods.base import MethodError, register_method
from gps_ds.methods.wrapping import WrappingMethod, head_modules, new_parameter
from gps_ds.rules import ParamRoles

SCALE, SHIFT = "ssf_scale", "ssf_shift"


def ssf_channels(module: nn.Module) -> tuple[int, int] | None:
    """(number of output channels, their dimension in the output) of a layer SSF follows, else None."""
    if isinstance(module, nn.Linear):
        return module.out_features, -1
    if isinstance(module, nn.Conv2d):
        return module.out_channels, 1
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        # timm's LayerNorm2d normalises channels-first (N, C, H, W) tensors
        return module.normalized_shape[0], 1 if "2d" in type(module).__name__.lower() else -1
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features, 1
    return None


def _ssf_hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    shape = [1] * output.dim()
    shape[module.ssf_dim] = -1
    output = output * module.ssf_scale.view(shape).to(output.dtype)
    shift = getattr(module, SHIFT, None)
    return output if shift is None else output + shift.view(shape).to(output.dtype)


@register_method
class SSF(WrappingMethod):
    name = "ssf"

    def wrap(self, model: nn.Module, roles: ParamRoles) -> list[str]:
        head = head_modules(model, roles)
        names = []
        for mod_name, module in list(model.named_modules()):
            found = ssf_channels(module)
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if not mod_name or mod_name in head or found is None or weight is None:
                continue  # a norm without affine has nothing to fold a scale into
            channels, dim = found
            module.register_parameter(SCALE, new_parameter(torch.ones(channels), weight))
            names.append(f"{mod_name}.{SCALE}")
            if bias is not None:  # a shift only where the merged layer has a bias to hold it
                module.register_parameter(SHIFT, new_parameter(torch.zeros(channels), weight))
                names.append(f"{mod_name}.{SHIFT}")
            module.ssf_dim = dim
            module.register_forward_hook(_ssf_hook)
        return names

    def merge(self, state: Mapping[str, torch.Tensor], delta: Delta, head: list[str]) -> dict[str, torch.Tensor]:
        """gamma and beta folded into the layer they follow: W' = gamma * W, b' = gamma * b + beta."""
        ssf = {n: t for n, t in delta.whole.items() if n.endswith((f".{SCALE}", f".{SHIFT}"))}
        rest = Delta(delta.selected, {n: t for n, t in delta.whole.items() if n not in ssf}, delta.meta)
        out = merge_state_dict(state, rest, head=head)
        for name, gamma in ssf.items():
            if not name.endswith(SCALE):
                continue
            layer = name[: -len(SCALE) - 1]
            beta = ssf.get(f"{layer}.{SHIFT}")
            w_name, b_name = f"{layer}.weight", f"{layer}.bias"
            for needed in (w_name, b_name) if beta is not None else (w_name,):
                if needed not in out:
                    raise MethodError(f"ssf merge: '{layer}' has no '{needed.rsplit('.', 1)[1]}' in the base "
                                      f"checkpoint to fold the scale and shift into")
            weight = out[w_name]
            out[w_name] = (weight.double() * gamma.double().reshape(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
            if b_name in out:
                bias = out[b_name].double() * gamma.double() + (0.0 if beta is None else beta.double())
                out[b_name] = bias.to(out[b_name].dtype)
        return out
