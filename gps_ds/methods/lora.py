"""LoRA (Hu et al., ICLR 2022) through Hugging Face PEFT: W x + (alpha / r) B A x on the target layers.

PEFT's `inject_adapter_in_model` wraps each target Linear / Conv2d in place (the base weight moves
to `<layer>.base_layer.weight`, the factors are `<layer>.lora_A.default.weight` (r, in) and
`<layer>.lora_B.default.weight` (out, r), B zero-initialised so training starts at the base model).
The delta holds the A/B factors and the head; `merge` folds them into a plain timm state dict:
W' = W + (alpha / r) B A (for a Conv2d, B A over the flattened kernel).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Mapping

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from gps_ds.delta import Delta, merge_state_dict
from gps_ds.methods.base import MethodError, register_method
from gps_ds.methods.wrapping import WrappingMethod, head_modules
from gps_ds.rules import ParamRoles

ADAPTER = "default"  # PEFT's adapter name: the parameters are `...lora_A.default.weight`
A_SUFFIX, B_SUFFIX = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"
#: attention qkv / proj and MLP fc1 / fc2 of every block, as timm names them in ViT, Swin and ConvNeXt
DEFAULT_TARGETS = ["*attn.qkv", "*attn.proj", "*mlp.fc1", "*mlp.fc2"]


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="rank of the update B A")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is (alpha / r) B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input")
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS),
                               description="fnmatch patterns of module names (Linear or Conv2d) to adapt")


def resolve_targets(model: nn.Module, roles: ParamRoles, patterns: list[str], strict: bool = True) -> list[str]:
    """Module names matched by `patterns` (head excluded), all Linear / ungrouped Conv2d. `strict`:
    every pattern must match (the user's own list); else only the list as a whole (the defaults,
    which name layers of several families: a ConvNeXt has no attention)."""
    head = head_modules(model, roles)
    modules = [(n, m) for n, m in model.named_modules() if n and n not in head]
    names: list[str] = []
    for pattern in patterns:
        hits = [(n, m) for n, m in modules if fnmatch.fnmatchcase(n, pattern)]
        if not hits and strict:
            raise MethodError(f"train.method_options.targets: '{pattern}' matches no module of this model")
        for n, m in hits:
            if not isinstance(m, (nn.Linear, nn.Conv2d)) or getattr(m, "groups", 1) != 1:
                raise MethodError(f"train.method_options.targets: '{pattern}' matches '{n}' "
                                  f"({type(m).__name__}); LoRA here adapts Linear and ungrouped Conv2d layers")
            if n not in names:
                names.append(n)
    if not names:
        raise MethodError(f"train.method_options.targets: {patterns} match no module of this model")
    return names


@register_method
class Lora(WrappingMethod):
    name = "lora"
    Options = LoraOptions

    def wrap(self, model: nn.Module, roles: ParamRoles) -> list[str]:
        from peft import LoraConfig, inject_adapter_in_model

        o = self.options
        targets = resolve_targets(model, roles, o.targets, strict="targets" in o.model_fields_set)
        # Full module names as a list: PEFT matches a list entry against the whole name (or a suffix).
        config = LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=targets, bias="none")
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        return [n for n, _ in model.named_parameters() if n.endswith((A_SUFFIX, B_SUFFIX))]

    def count_unwrapped(self, model: nn.Module, roles: ParamRoles) -> dict[str, int]:
        """A (r, in[, kh, kw]) + B (out, r[, 1, 1]) per target, + the head; without importing PEFT."""
        self.check_family(roles)
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        targets = resolve_targets(model, roles, self.options.targets, strict="targets" in self.options.model_fields_set)
        r = self.options.r
        factors = sum(r * (math.prod(modules[t].weight.shape[1:]) + modules[t].weight.shape[0]) for t in targets)
        whole = factors + sum(params[n].numel() for n in roles.head)
        return {"selected": 0, "whole": whole, "total": whole}

    def merge(self, state: Mapping[str, torch.Tensor], delta: Delta, head: list[str]) -> dict[str, torch.Tensor]:
        """The plain state dict: every target weight W + (alpha / r) B A, the head from the delta."""
        scaling = self.options.alpha / self.options.r
        factors = {n: t for n, t in delta.whole.items() if n.endswith((A_SUFFIX, B_SUFFIX))}
        rest = Delta(delta.selected, {n: t for n, t in delta.whole.items() if n not in factors}, delta.meta)
        out = merge_state_dict(state, rest, head=head)
        for a_name, a in factors.items():
            if not a_name.endswith(A_SUFFIX):
                continue
            layer = a_name[: -len(A_SUFFIX)]
            b = factors.get(layer + B_SUFFIX)
            weight = state.get(layer + ".weight")
            if b is None or weight is None:
                missing = layer + B_SUFFIX if b is None else layer + ".weight"
                raise MethodError(f"lora merge: '{missing}' is missing (delta or base checkpoint)")
            update = (b.double().flatten(1) @ a.double().flatten(1)) * scaling
            if update.numel() != weight.numel():
                raise MethodError(f"lora merge: '{layer}' has shape {tuple(weight.shape)} in the base checkpoint, "
                                  f"the delta's factors give {tuple(update.shape)}")
            out[layer + ".weight"] = (weight.double() + update.reshape(weight.shape)).to(weight.dtype)
        return out
