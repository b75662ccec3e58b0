"""Visual Prompt Tuning (Jia et al., ECCV 2022) for timm VisionTransformers.

`vpt-shallow`: `tokens` learnable prompt tokens inserted after the class token (and any other
prefix tokens) of the embedded input, before the first block. `vpt-deep`: the same at the first
block, and every later block's prompt positions replaced by that block's own prompts. Prompts get
no position embedding; the head reads the class token as before. `model.blocks` becomes a
`PromptedBlocks` (an `nn.Sequential` with the same children, so every base parameter keeps its
name) holding `blocks.prompts` of shape (1 or depth, tokens, embed_dim); it takes over the model's
gradient checkpointing (timm's would call the blocks without the prompts). Not mergeable.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from pydantic import BaseModel, ConfigDict, Field

from gps_ds.methods.base import MethodError, register_method
from gps_ds.methods.wrapping import WrappingMethod, new_parameter
from gps_ds.rules import ParamRoles


class PromptedBlocks(nn.Sequential):
    """The blocks of a ViT, with prompt tokens written in front of the patch tokens."""

    def __init__(self, blocks: nn.Sequential, prompts: nn.Parameter, prefix: int, dropout: float,
                 grad_checkpointing: bool = False) -> None:
        super().__init__(*blocks)
        self.prompts = prompts  # (1 shallow | depth deep, tokens, dim)
        self.prefix = prefix
        self.prompt_dropout = nn.Dropout(dropout)
        self.grad_checkpointing = grad_checkpointing  # recompute each block in backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens = self.prefix, self.prompts.shape[1]
        for i, block in enumerate(self):
            if i < self.prompts.shape[0]:
                p = self.prompt_dropout(self.prompts[i]).to(x.dtype).expand(x.shape[0], -1, -1)
                after = x[:, n:] if i == 0 else x[:, n + tokens:]  # insert at block 0, replace later
                x = torch.cat([x[:, :n], p, after], dim=1)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class VptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: int = Field(10, ge=1, description="prompt tokens (per block for vpt-deep)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the prompt tokens")


def prompt_init(prompts: torch.Tensor, patch_size: tuple[int, int], dim: int) -> torch.Tensor:
    """VPT's initialisation: uniform(-v, v), v = sqrt(6 / (3 * patch_h * patch_w + dim))."""
    v = math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + dim))
    return nn.init.uniform_(prompts, -v, v)


class _Vpt(WrappingMethod):
    mergeable = False
    Options = VptOptions
    families = ("vit",)
    deep: bool

    def wrap(self, model: nn.Module, roles: ParamRoles) -> list[str]:
        if getattr(model, "attn_pool", None) is not None or getattr(model, "global_pool", None) != "token":
            raise MethodError(f"train.method '{self.name}' needs a ViT whose head reads the class token "
                              f"(model global_pool 'token'; this one pools '{getattr(model, 'global_pool', None)}')")
        blocks = model.blocks
        like = next(blocks.parameters())
        depth = len(blocks) if self.deep else 1
        data = prompt_init(torch.empty(depth, self.options.tokens, model.embed_dim), model.patch_embed.patch_size,
                           model.embed_dim)
        # timm's own checkpointing (`checkpoint_seq(model.blocks, x)`) would call the blocks without
        # the prompts: PromptedBlocks checkpoints each block itself instead.
        checkpointing = bool(getattr(model, "grad_checkpointing", False))
        model.grad_checkpointing = False
        model.blocks = PromptedBlocks(blocks, new_parameter(data, like), model.num_prefix_tokens,
                                      self.options.dropout, checkpointing)
        return ["blocks.prompts"]


@register_method
class VptShallow(_Vpt):
    name = "vpt-shallow"
    deep = False


@register_method
class VptDeep(_Vpt):
    name = "vpt-deep"
    deep = True
