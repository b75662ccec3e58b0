"""Which parameters GPS scores (candidates), trains whole, or keeps frozen.

REFERENCE.md, "Selection": candidates are the weights of Linear and Conv layers; every bias,
layer-scale `gamma` and the task head are trained whole; norms, position embeddings, class
tokens and relative-position tables stay frozen. SAM: the image encoder follows those rules,
the mask decoder and the no-mask embedding are trained whole, the rest of the prompt encoder
is frozen. Config overrides (fnmatch patterns) are checked in the order frozen, whole,
candidate; the first match decides.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch.nn as nn

Role = Literal["candidate", "whole", "frozen"]
Family = Literal["vit", "swin", "convnext", "sam", "generic"]

FROZEN_NAMES = (
    "pos_embed", "cls_token", "dist_token", "reg_token", "mask_token", "absolute_pos_embed",
    "relative_position_bias_table", "rel_pos_h", "rel_pos_w", "pos_embed_window",
)
LAYER_SCALE_NAMES = ("gamma",)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm,
)
CANDIDATE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


class RuleError(ValueError):
    pass


@dataclass
class ParamRoles:
    """Role of every parameter, in `named_parameters()` order."""

    roles: dict[str, Role]
    family: Family
    head: list[str] = field(default_factory=list)

    def names(self, role: Role) -> list[str]:
        return [n for n, r in self.roles.items() if r == role]

    @property
    def candidates(self) -> list[str]:
        return self.names("candidate")

    @property
    def whole(self) -> list[str]:
        return self.names("whole")

    @property
    def frozen(self) -> list[str]:
        return self.names("frozen")


def detect_family(model: nn.Module) -> Family:
    cls = type(model).__name__
    if cls == "VisionTransformer":
        return "vit"
    if cls.startswith("SwinTransformer"):
        return "swin"
    if cls == "ConvNeXt":
        return "convnext"
    if hasattr(model, "image_encoder") and hasattr(model, "mask_decoder"):
        return "sam"
    return "generic"


def is_norm(module: nn.Module) -> bool:
    # timm's LayerNorm2d and SAM's LayerNorm2d are not nn.LayerNorm subclasses in every version.
    return isinstance(module, NORM_TYPES) or "Norm" in type(module).__name__


def head_parameter_names(model: nn.Module) -> list[str]:
    """Parameters of the task head: timm's `get_classifier()`, else none."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        return []
    head = get()
    if not isinstance(head, nn.Module):
        return []
    owned = {id(p) for p in head.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in owned]


def _default_role(name: str, module: nn.Module, leaf: str, param: nn.Parameter, head: set[str]) -> Role:
    if name in head:
        return "whole"
    if is_norm(module) or leaf in FROZEN_NAMES:
        return "frozen"
    if leaf == "bias":
        return "whole"
    if leaf in LAYER_SCALE_NAMES and param.dim() == 1:
        return "whole"
    if leaf == "weight" and isinstance(module, CANDIDATE_TYPES) and param.dim() >= 2:
        return "candidate"
    return "frozen"


# Single-mask output (the polyp recipe) decodes mask token 0 only: the IoU head and the other
# tokens' hypernetworks get no gradient, so they stay frozen instead of counting as trained.
SAM_UNUSED_DECODER = ("mask_decoder.iou_prediction_head.", "mask_decoder.output_hypernetworks_mlps.")


def _sam_unused(name: str) -> bool:
    if name.startswith(SAM_UNUSED_DECODER[0]):
        return True
    return name.startswith(SAM_UNUSED_DECODER[1]) and not name.startswith(SAM_UNUSED_DECODER[1] + "0.")


def _sam_role(name: str, default: Role) -> Role:
    if name.startswith("mask_decoder."):
        return "frozen" if _sam_unused(name) else "whole"
    if name.startswith("prompt_encoder."):
        return "whole" if name.startswith("prompt_encoder.no_mask_embed.") else "frozen"
    return default


def _match(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def classify(model: nn.Module, family: str = "auto", overrides=None) -> ParamRoles:
    """Assign every parameter of `model` a role. `overrides` is a `RuleOverrides`-like object."""
    fam: Family = detect_family(model) if family in (None, "auto") else family  # type: ignore[assignment]
    head = set(head_parameter_names(model))
    if fam == "sam":  # the task head of a SAM is its mask decoder
        head = {n for n, _ in model.named_parameters() if n.startswith("mask_decoder.") and not _sam_unused(n)}
    roles: dict[str, Role] = {}
    for mod_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            role = _default_role(name, module, leaf, param, head)
            if fam == "sam":
                role = _sam_role(name, role)
            if overrides is not None:
                role = _apply_overrides(name, module, param, role, overrides)
            roles[name] = role
    order = [n for n, _ in model.named_parameters()]
    return ParamRoles({n: roles[n] for n in order}, fam, [n for n in order if n in head])


def _apply_overrides(name: str, module: nn.Module, param: nn.Parameter, role: Role, overrides) -> Role:
    if _match(name, overrides.frozen):
        return "frozen"
    if _match(name, overrides.whole):
        return "whole"
    if _match(name, overrides.candidate):
        if not (isinstance(module, CANDIDATE_TYPES) and param.dim() >= 2):
            raise RuleError(
                f"gps.rules.candidate matches '{name}', which is not the weight of a Linear or Conv2d layer"
            )
        return "candidate"
    return role


def trainable_names(roles: ParamRoles, method: str) -> list[str]:
    """Names trained as whole tensors by `method` (gps adds its selected entries on top)."""
    from gps_ds.methods import MethodError, get_method

    try:
        return get_method(method).trainable_whole(roles)
    except MethodError as err:
        raise RuleError(str(err)) from None
