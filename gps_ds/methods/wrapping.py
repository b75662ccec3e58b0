"""Shared shape of the methods that add new modules to the model (lora, adapter, vpt, ssf).

`prepare` freezes the base model, lets the subclass wrap it in place (`wrap` returns the names of
the new trainable tensors) and trains those plus the task head. The delta holds exactly those
tensors by name; `gps-ds eval` wraps a fresh base model the same way, then loads them.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from gps_ds.delta import Delta, load_delta_into_model
from gps_ds.methods.base import Method, MethodError, Prepared, set_trainable
from gps_ds.rules import ParamRoles


class WrappingMethod(Method):
    """A method whose trainable tensors are new modules attached to the frozen base model."""

    #: families the method knows how to wrap (checked before anything changes)
    families: tuple[str, ...] = ("vit", "swin", "convnext")

    def trainable_whole(self, roles: ParamRoles) -> list[str]:
        # Before wrapping, only the head is a base-model tensor that trains.
        return list(roles.head)

    def check_family(self, roles: ParamRoles) -> None:
        if roles.family not in self.families:
            raise MethodError(f"train.method '{self.name}' supports model families {', '.join(self.families)}; "
                              f"this model is '{roles.family}' (model.family)")

    def wrap(self, model: nn.Module, roles: ParamRoles) -> list[str]:
        """Attach the method's modules to `model` in place; return the new parameters' names."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, roles: ParamRoles, selection: dict[str, torch.Tensor] | None = None,
                mode: str = "sparse") -> Prepared:
        self.check_family(roles)
        added = self.wrap(model, roles)
        whole = added + list(roles.head)
        set_trainable(model, whole)
        return Prepared(self.name, whole, impl=self)

    def count_unwrapped(self, model: nn.Module, roles: ParamRoles) -> dict[str, int]:
        """What `count` would report after `prepare`, without changing `model` (wraps a copy;
        cheap for a meta-device model). Raises MethodError for a family the method refuses."""
        import copy

        twin = copy.deepcopy(model)
        return self.count(twin, self.prepare(twin, roles))

    def apply_delta(self, model: nn.Module, roles: ParamRoles, delta: Delta) -> nn.Module:
        self.prepare(model, roles)
        load_delta_into_model(model, delta)  # refuses a tensor the wrapped model does not have
        model.requires_grad_(False)
        return model

    def merge(self, state: Mapping[str, torch.Tensor], delta: Delta, head: list[str]) -> dict[str, torch.Tensor]:
        raise MethodError(f"a '{self.name}' delta cannot be merged into a plain checkpoint of the base architecture "
                          f"(its modules are extra layers); evaluate it with `gps-ds eval --delta`")


def new_parameter(data: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """A parameter holding `data` on the device and in the dtype of the weight `like` it attaches to."""
    return nn.Parameter(data.to(device=like.device, dtype=like.dtype))


def head_modules(model: nn.Module, roles: ParamRoles) -> set[str]:
    """Names of the modules that own the task head's parameters (never wrapped)."""
    head = set(roles.head)
    return {name for name, mod in model.named_modules()
            if any(f"{name}.{leaf}" in head for leaf, _ in mod.named_parameters(recurse=False))}
