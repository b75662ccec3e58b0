"""Bottleneck adapters (Houlsby et al., ICML 2019), placed as in the PEFT-for-ViT comparisons.

In every transformer block, the output of the attention branch and of the MLP branch passes
through a bottleneck before the residual add:  h -> h + up(act(down(h))). `up` starts at zero, so
the wrapped model starts exactly at the base model. timm's ViT and Swin blocks both compute
`x + drop_path1(<attention branch>)` and `x + drop_path2(<mlp branch>)`; the adapter goes in front
of the drop-path (`blocks.N.drop_path1` becomes `Sequential(adapter, drop_path)`), so its
parameters are named `...drop_path1.adapter.down.weight` etc. Not mergeable: the bottleneck is
non-linear, a plain checkpoint of the base architecture cannot hold it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from gps_ds.methods.base import register_method
from gps_ds.methods.wrapping import WrappingMethod
from gps_ds.rules import ParamRoles


class Adapter(nn.Module):
    """h + up(act(down(h))) over the last dimension; `up` zero-initialised."""

    def __init__(self, dim: int, bottleneck: int, like: torch.Tensor) -> None:
        super().__init__()
        kw = dict(device=like.device, dtype=like.dtype)
        self.down = nn.Linear(dim, bottleneck, **kw)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim, **kw)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class AdapterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(8, ge=1, description="bottleneck width")


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Blocks with an attention branch and an MLP branch behind drop_path1 / drop_path2 (timm)."""
    return [(n, m) for n, m in model.named_modules()
            if all(hasattr(m, a) for a in ("attn", "mlp", "drop_path1", "drop_path2", "norm1"))]


@register_method
class AdapterMethod(WrappingMethod):
    name = "adapter"
    mergeable = False
    Options = AdapterOptions
    families = ("vit", "swin")

    def wrap(self, model: nn.Module, roles: ParamRoles) -> list[str]:
        names = []
        for block_name, block in transformer_blocks(model):
            like = next(block.parameters())  # the block's own weights: device and dtype of the new layers
            dim = block.norm1.normalized_shape[-1]
            for slot in ("drop_path1", "drop_path2"):
                adapter = Adapter(dim, self.options.dim, like)
                setattr(block, slot, nn.Sequential(OrderedDict(adapter=adapter, drop_path=getattr(block, slot))))
                names += [f"{block_name}.{slot}.adapter.{n}" for n, _ in adapter.named_parameters()]
        return names
