"""The method interface: which parameters a fine-tuning method trains, how it wraps the model,
what its delta file holds and how that delta goes back into a model or a plain checkpoint.

One module per method registers a `Method` subclass (the way PEFT keeps one folder per tuner);
the trainer, `gps-ds eval`, `gps-ds delta merge` and the benchmarks only talk to this interface.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, ValidationError

from gps_ds.delta import Delta, extract_delta, load_delta_into_model, merge_state_dict
from gps_ds.rules import ParamRoles


class MethodError(ValueError):
    """A method that does not exist or options it does not accept: one line for the user."""


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class Prepared:
    """What `Method.prepare` did to a model."""

    method: str
    whole: list[str]  # names (in the prepared model) of tensors trained whole and saved in the delta
    selection: dict[str, torch.Tensor] | None = None  # gps: (rows, K) indices per candidate weight
    mode: str | None = None  # gps: "sparse" | "masked"
    masked: object | None = None  # gps masked mode: MaskedGradients, attached to the optimizer later
    stats: dict = field(default_factory=dict)
    impl: "Method | None" = None  # the Method that prepared the model


class Method:
    """Base class. Subclasses set `name` and override what differs from 'train some whole tensors'."""

    name: ClassVar[str]
    #: the scoring pass must run first (`prepare` gets a selection)
    needs_selection: ClassVar[bool] = False
    #: its delta merges into a plain checkpoint of the base architecture
    mergeable: ClassVar[bool] = True
    #: pydantic model of `train.method_options`
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        try:
            self.options = self.Options.model_validate(dict(options or {}))
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            what = "unknown option" if first["type"] == "extra_forbidden" else first["msg"]
            raise MethodError(f"train.method_options.{key}: {what} (method '{self.name}')") from None

    # -- which parameters train -----------------------------------------------------------------
    def trainable_whole(self, roles: ParamRoles) -> list[str]:
        """Base-model parameters trained as whole tensors."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, roles: ParamRoles, selection: dict[str, torch.Tensor] | None = None,
                mode: str = "sparse") -> Prepared:
        """Freeze everything, then make the model train what this method trains (in place)."""
        whole = self.trainable_whole(roles)
        set_trainable(model, whole)
        return Prepared(self.name, whole, impl=self)

    def count(self, model: nn.Module, prepared: Prepared) -> dict[str, int]:
        """Trained parameter counts: selected entries, whole tensors, total."""
        params = dict(model.named_parameters())
        whole = sum(params[n].numel() for n in prepared.whole)
        selected = 0
        if prepared.selection is not None:
            selected = sum(int((idx >= 0).sum()) for idx in prepared.selection.values())
        return {"selected": selected, "whole": whole, "total": selected + whole}

    # -- delta files ------------------------------------------------------------------------------
    def extract(self, model: nn.Module, prepared: Prepared, meta: Mapping[str, Any]) -> Delta:
        """The delta of a trained model (full tensors; under ZeRO-3 call inside a gather)."""
        return extract_delta(model, prepared.whole, None, meta)

    def load_trained(self, model: nn.Module, prepared: Prepared, delta: Delta) -> None:
        """Write a delta of this method back into a model it prepared (the inverse of `extract`)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in delta.whole.items():
                params[name].copy_(t)

    def apply_delta(self, model: nn.Module, roles: ParamRoles, delta: Delta) -> nn.Module:
        """The trained model from a freshly built base model and its delta (for evaluation)."""
        load_delta_into_model(model, delta)
        return model

    def merge(self, state: Mapping[str, torch.Tensor], delta: Delta, head: list[str]) -> dict[str, torch.Tensor]:
        """A plain state dict of the base architecture with the delta merged in."""
        return merge_state_dict(state, delta, head=head)


def set_trainable(model: nn.Module, names: list[str]) -> None:
    """requires_grad only for `names` (which must all be parameters of `model`)."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise MethodError(f"parameter '{missing[0]}' is not in the model")
    for p in params.values():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available as `train.method = cls.name`."""
    METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str, options: Mapping[str, Any] | None = None) -> Method:
    if name not in METHODS:
        raise MethodError(f"unknown train.method '{name}' (expected one of: {', '.join(METHODS)})")
    return METHODS[name](options)
