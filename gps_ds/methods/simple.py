"""Methods that train whole tensors of the base model: full, linear, bitfit, decoder."""

from __future__ import annotations

from gps_ds.methods.base import Method, register_method
from gps_ds.rules import ParamRoles


@register_method
class Full(Method):
    name = "full"

    def trainable_whole(self, roles: ParamRoles) -> list[str]:
        return list(roles.roles)


@register_method
class Linear(Method):
    """Linear probing: the task head only (for SAM, the head is the mask decoder)."""

    name = "linear"

    def trainable_whole(self, roles: ParamRoles) -> list[str]:
        return list(roles.head)


@register_method
class Decoder(Linear):
    """SAM's mask decoder only: the same parameters as linear probing, under the name SAM papers use."""

    name = "decoder"

    def trainable_whole(self, roles: ParamRoles) -> list[str]:
        if roles.family != "sam":
            from gps_ds.methods.base import MethodError

            raise MethodError("train.method 'decoder' is for SAM models (the mask decoder); use 'linear' here")
        return super().trainable_whole(roles)


@register_method
class BitFit(Method):
    """Every bias, norm biases included (0.10M on ViT-B/16, as peers count it), plus the head."""

    name = "bitfit"

    def trainable_whole(self, roles: ParamRoles) -> list[str]:
        head = set(roles.head)
        return [n for n in roles.roles if n in head or n.endswith("bias")]
