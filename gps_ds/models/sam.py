"""Segment Anything models from segment-anything's modeling classes.

`build_sam` follows the published ViT-B/L/H layouts (weights from a local checkpoint only);
`build_small_sam` is the same architecture scaled down so that tests run in seconds on a CPU.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn


def _assemble(img_size: int, patch: int, enc_dim: int, depth: int, heads: int, global_idx: tuple[int, ...],
              window: int, prompt_dim: int, decoder_depth: int, decoder_mlp: int) -> nn.Module:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = img_size // patch
    encoder = ImageEncoderViT(
        img_size=img_size, patch_size=patch, embed_dim=enc_dim, depth=depth, num_heads=heads,
        out_chans=prompt_dim, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        window_size=window, global_attn_indexes=global_idx,
    )
    prompt = PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                           input_image_size=(img_size, img_size), mask_in_chans=16)
    decoder = MaskDecoder(
        transformer_dim=prompt_dim, num_multimask_outputs=3, iou_head_hidden_dim=prompt_dim,
        transformer=TwoWayTransformer(depth=decoder_depth, embedding_dim=prompt_dim, num_heads=2 if prompt_dim < 256 else 8,
                                      mlp_dim=decoder_mlp),
    )
    return Sam(encoder, prompt, decoder)


SAM_VARIANTS = {
    # embed dim, depth, heads, global attention blocks (segment-anything's build_sam.py layouts)
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


def build_sam(variant: str = "vit_b", checkpoint: str | None = None) -> nn.Module:
    if variant not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM variant '{variant}' (expected one of: {', '.join(SAM_VARIANTS)})")
    dim, depth, heads, global_idx = SAM_VARIANTS[variant]
    model = _assemble(1024, 16, dim, depth, heads, global_idx, 14, 256, 2, 2048)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model


def build_small_sam(img_size: int = 64, embed_dim: int = 32, depth: int = 2, prompt_dim: int = 32) -> nn.Module:
    return _assemble(img_size, 16, embed_dim, depth, 2, (depth - 1,), 2, prompt_dim, 1, 64)
