"""Segment Anything models for fine-tuning, built from segment-anything's own modules.

`SamSegmenter` holds SAM's `image_encoder`, `prompt_encoder` and `mask_decoder` as direct
attributes, so its parameter and state-dict names are those of a plain `Sam` (an official
checkpoint loads strictly, and a merged delta loads back into `sam_model_registry[...]()`).
Its forward is differentiable and batched: every image gets its own prompt, which the stock
`Sam.forward` (no_grad) and `MaskDecoder.predict_masks` (repeat_interleave) do not allow.

`sam_vit_b/l/h` come from segment-anything's registry at 1024 px, or from its modeling classes
with the same layout at other sizes; `sam_small` is the same architecture scaled down so that
tests run in seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from gps_ds.models.factory import ModelError

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

SAM_VARIANTS = {
    # embed dim, depth, heads, global attention blocks (segment-anything's build_sam.py layouts)
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
SAM_MODEL_NAMES = ("sam_small", *(f"sam_{v}" for v in SAM_VARIANTS))
SAM_NATIVE_SIZE = 1024
SMALL_SAM_DEFAULT_SIZE = 64
SMALL_SAM_KWARGS = ("embed_dim", "depth", "num_heads", "patch_size", "window_size", "global_attn_indexes",
                    "prompt_dim", "decoder_depth", "decoder_heads", "decoder_mlp_dim", "mask_in_chans")


class SamSegmenter(nn.Module):
    """SAM as a binary segmenter: images [B,3,S,S] (normalised, padded) -> mask logits [B,1,S,S]."""

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Not used by forward (the data pipeline normalises); kept, non-persistent, as in upstream `Sam`.
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)
        self.grad_checkpointing = False

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each image-encoder block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, prompt_dim, S/patch, S/patch]."""
        enc = self.image_encoder
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return enc(images)
        # ImageEncoderViT.forward, with every block checkpointed.
        x = enc.patch_embed(images)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        for block in enc.blocks:
            x = activation_checkpoint(block, x, use_reentrant=False)
        return enc.neck(x.permute(0, 3, 1, 2))

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Single-mask logits [B,1,S,S]. `boxes` [B,4] (x0,y0,x1,y1 in input pixels), one per image;
        without boxes every image is decoded with the learned no-mask embedding only."""
        size = self.img_size
        if images.dim() != 4 or tuple(images.shape[-2:]) != (size, size):
            raise ModelError(f"SAM expects images [B,3,{size},{size}] (model.img_size={size}), "
                             f"got {list(images.shape)}")
        batch = images.shape[0]
        if boxes is not None and tuple(boxes.shape) != (batch, 4):
            raise ValueError(f"boxes must be [B,4] = [{batch},4], got {list(boxes.shape)}")
        embeddings = self.encode(images)
        dtype = embeddings.dtype
        pe = self.prompt_encoder
        dense = pe.no_mask_embed.weight.to(dtype).reshape(1, -1, 1, 1)
        if boxes is None:
            sparse = embeddings.new_zeros(batch, 0, embeddings.shape[1])
        else:
            sparse = self._embed_boxes(boxes).to(dtype)
        low_res = self._decode_single_mask(embeddings, sparse, dense)
        return F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)

    # The prompt encoder's random-Fourier positional encoding is computed here in fp32 from its
    # (frozen) Gaussian matrix: upstream's PromptEncoder multiplies fp32 coordinates by that matrix
    # and so fails once the model is cast to bf16/fp16 (as DeepSpeed does), and a bf16 sin/cos of
    # angles up to ~20 rad would lose the encoding's precision anyway.
    def _fourier_pe(self, unit_coords: torch.Tensor) -> torch.Tensor:
        """[..., 2] (x, y) in [0, 1] -> [..., prompt_dim]."""
        gaussian = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.float()
        angles = 2 * math.pi * ((2 * unit_coords.float() - 1) @ gaussian)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def _dense_pe(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Positional encoding of the embedding grid's cell centres, [1, prompt_dim, h, w]."""
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return self._fourier_pe(torch.stack([grid_x, grid_y], dim=-1)).permute(2, 0, 1).unsqueeze(0)

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Box corners (pixel centres) -> [B, 2, prompt_dim]: position code plus corner embedding."""
        pe = self.prompt_encoder
        in_h, in_w = pe.input_image_size
        corners = (boxes.float() + 0.5).reshape(-1, 2, 2)
        unit = torch.stack([corners[..., 0] / in_w, corners[..., 1] / in_h], dim=-1)
        corner_type = torch.cat([pe.point_embeddings[2].weight, pe.point_embeddings[3].weight], dim=0)
        return self._fourier_pe(unit) + corner_type

    def _decode_single_mask(self, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """MaskDecoder.predict_masks with one prompt set per image (no repeat_interleave), keeping
        only the single-mask output (mask token 0), as `multimask_output=False` does."""
        dec = self.mask_decoder
        batch, channels, h, w = embeddings.shape
        output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0).to(embeddings.dtype)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
        image_pe = self._dense_pe(h, w, embeddings.device).to(embeddings.dtype).expand(batch, -1, -1, -1)
        token_out, image_out = dec.transformer(embeddings + dense, image_pe, tokens)
        upscaled = dec.output_upscaling(image_out.transpose(1, 2).reshape(batch, channels, h, w))
        hyper = dec.output_hypernetworks_mlps[0](token_out[:, 1, :])  # [B, C/8]
        return torch.einsum("bc,bchw->bhw", hyper, upscaled).unsqueeze(1)


def boxes_from_masks(masks: torch.Tensor, jitter: float = 0.1, max_shift: int = 20,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Box prompts [B,4] (x0,y0,x1,y1, inclusive pixel coordinates, float) around each mask [B,1,H,W].

    Each side moves by a uniform random amount of at most `jitter` x the box's side length, capped
    at `max_shift` pixels; boxes are clamped to the image. An empty mask gives the whole image."""
    if masks.dim() != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must be [B,1,H,W], got {list(masks.shape)}")
    fg = masks[:, 0] > 0
    height, width = fg.shape[-2:]
    x0, x1 = _first_last(fg.any(dim=1), width)
    y0, y1 = _first_last(fg.any(dim=2), height)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    if jitter > 0 and max_shift > 0:
        side = (boxes[:, 2:] - boxes[:, :2] + 1).repeat(1, 2)  # [w, h, w, h]
        reach = torch.clamp(side * jitter, max=float(max_shift))
        # A generator on another device than the masks costs one small copy.
        gen_device = generator.device if generator is not None else masks.device
        unit = torch.rand(boxes.shape, generator=generator, device=gen_device).to(masks.device)
        boxes = boxes + (2 * unit - 1) * reach
        xs, ys = boxes[:, 0::2].clamp(0, width - 1), boxes[:, 1::2].clamp(0, height - 1)
        boxes = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1)
        # A tiny box can have its sides cross; keep x0 <= x1 and y0 <= y1.
        lo, hi = torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])
        boxes = torch.cat([lo, hi], dim=1)
    return boxes


def _first_last(occupied: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last True index along dim 1 of [B, length]; 0 and length-1 for an empty row
    (argmax of an all-zero row is 0 from either end)."""
    as_int = occupied.to(torch.uint8)
    return as_int.argmax(dim=1), length - 1 - as_int.flip(dims=[1]).argmax(dim=1)


def _assemble(img_size: int, patch: int, enc_dim: int, depth: int, heads: int, global_idx: Sequence[int],
              window: int, prompt_dim: int, decoder_depth: int, decoder_mlp: int, decoder_heads: int | None = None,
              mask_in_chans: int = 16) -> SamSegmenter:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

    grid = img_size // patch
    encoder = ImageEncoderViT(
        img_size=img_size, patch_size=patch, embed_dim=enc_dim, depth=depth, num_heads=heads,
        out_chans=prompt_dim, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        window_size=window, global_attn_indexes=tuple(global_idx),
    )
    prompt = PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                           input_image_size=(img_size, img_size), mask_in_chans=mask_in_chans)
    if decoder_heads is None:
        decoder_heads = 2 if prompt_dim < 256 else 8
    decoder = MaskDecoder(
        transformer_dim=prompt_dim, num_multimask_outputs=3, iou_head_hidden_dim=prompt_dim,
        transformer=TwoWayTransformer(depth=decoder_depth, embedding_dim=prompt_dim, num_heads=decoder_heads,
                                      mlp_dim=decoder_mlp),
    )
    return SamSegmenter(encoder, prompt, decoder)


def build_sam(variant: str = "vit_b", img_size: int = SAM_NATIVE_SIZE) -> SamSegmenter:
    """A published SAM layout: segment-anything's registry at 1024 px, else the same layout at `img_size`."""
    if variant not in SAM_VARIANTS:
        raise ModelError(f"unknown SAM variant '{variant}' (expected one of: {', '.join(SAM_VARIANTS)})")
    if img_size == SAM_NATIVE_SIZE:
        from segment_anything import sam_model_registry

        sam = sam_model_registry[variant]()
        return SamSegmenter(sam.image_encoder, sam.prompt_encoder, sam.mask_decoder).train()
    dim, depth, heads, global_idx = SAM_VARIANTS[variant]
    return _assemble(img_size, 16, dim, depth, heads, global_idx, 14, 256, 2, 2048, decoder_heads=8)


def build_small_sam(img_size: int = SMALL_SAM_DEFAULT_SIZE, embed_dim: int = 32, depth: int = 2,
                    prompt_dim: int = 32, **kwargs: Any) -> SamSegmenter:
    """SAM's architecture scaled down; further sizes from SMALL_SAM_KWARGS."""
    unknown = sorted(set(kwargs) - set(SMALL_SAM_KWARGS))
    if unknown:
        raise ModelError(f"model.kwargs.{unknown[0]} is not a sam_small setting "
                         f"(expected some of: {', '.join(SMALL_SAM_KWARGS)})")
    patch = kwargs.get("patch_size", 16)
    heads = kwargs.get("num_heads", 2)
    if img_size % patch:
        raise ModelError(f"model.img_size={img_size} is not a multiple of model.kwargs.patch_size={patch}")
    if embed_dim % heads:
        raise ModelError(f"model.kwargs.embed_dim={embed_dim} is not a multiple of model.kwargs.num_heads={heads}")
    if prompt_dim % 8:
        raise ModelError(f"model.kwargs.prompt_dim={prompt_dim} must be a multiple of 8 (SAM's mask decoder)")
    global_idx = kwargs.get("global_attn_indexes", (depth - 1,))
    return _assemble(
        img_size, patch, embed_dim, depth, heads, global_idx, kwargs.get("window_size", 2), prompt_dim,
        kwargs.get("decoder_depth", 1), kwargs.get("decoder_mlp_dim", 64), kwargs.get("decoder_heads"),
        kwargs.get("mask_in_chans", 16),
    )


def create_sam(name: str, *, pretrained: bool | str = False, checkpoint: str | None = None,
               drop_path_rate: float = 0.0, img_size: int | None = None, kwargs: dict[str, Any] | None = None,
               device: str | torch.device | None = None, grad_checkpointing: bool = False) -> SamSegmenter:
    """`name` in SAM_MODEL_NAMES; weights only from `checkpoint` (an official .pth or a .safetensors)."""
    if name not in SAM_MODEL_NAMES:
        raise ModelError(f"unknown model.name '{name}' (SAM models: {', '.join(SAM_MODEL_NAMES)})")
    if pretrained and checkpoint is None:
        raise ModelError(f"model.pretrained: SAM weights come only from model.checkpoint (a local .pth or "
                         f".safetensors file); set model.checkpoint for '{name}'")
    if drop_path_rate:
        raise ModelError(f"model.drop_path_rate: SAM's image encoder has no drop path; set it to 0 for '{name}'")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ModelError(f"model.checkpoint: file not found: {checkpoint}")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if name == "sam_small":
            model = build_small_sam(img_size or SMALL_SAM_DEFAULT_SIZE, **dict(kwargs or {}))
        else:
            if kwargs:
                raise ModelError(f"model.kwargs.{next(iter(kwargs))} is not used by {name} "
                                 f"(only sam_small takes sizes)")
            model = build_sam(name.removeprefix("sam_"), img_size or SAM_NATIVE_SIZE)
    if checkpoint is not None and torch.device(device or "cpu").type != "meta":
        load_sam_checkpoint(model, checkpoint)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def load_sam_checkpoint(model: SamSegmenter, path: str) -> None:
    """Load a plain SAM state dict strictly. The absolute position embedding and the relative-position
    tables of global-attention blocks are resized when the checkpoint was trained at another image size."""
    from gps_ds.weights import WeightsError, load_state_dict

    try:
        state = load_state_dict(path)
    except WeightsError as err:
        raise ModelError(f"model.checkpoint: {err}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = f"'{missing[0]}' is missing" if missing else f"'{unexpected[0]}' is not a parameter of the model"
        raise ModelError(f"model.checkpoint {path} does not fit {type(model).__name__}: {first} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    for key, target in expected.items():
        if state[key].shape != target.shape:
            state[key] = _resize_or_refuse(key, state[key], tuple(target.shape), path)
    model.load_state_dict(state, strict=True)


def _resize_or_refuse(key: str, value: torch.Tensor, shape: tuple[int, ...], path: str) -> torch.Tensor:
    leaf = key.rsplit(".", 1)[-1]
    if key == "image_encoder.pos_embed" and value.dim() == 4 and value.shape[-1] == shape[-1]:
        return resize_pos_embed(value, shape[1:3])
    if leaf in ("rel_pos_h", "rel_pos_w") and value.dim() == 2 and value.shape[1] == shape[1]:
        return resize_rel_pos(value, shape[0])
    raise ModelError(f"model.checkpoint {path} does not fit the model: '{key}' has shape {list(value.shape)}, "
                     f"the model {list(shape)}")


def resize_pos_embed(pos_embed: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """[1, h, w, C] -> [1, grid[0], grid[1], C], antialiased bicubic (timm's choice for ViT position embeddings)."""
    nchw = pos_embed.permute(0, 3, 1, 2).float()
    resized = F.interpolate(nchw, size=tuple(grid), mode="bicubic", align_corners=False, antialias=True)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype)


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """[L, C] -> [length, C], linear: the resampling segment-anything applies on the fly when a
    relative-position table does not match the attention size."""
    resized = F.interpolate(table.float().t().unsqueeze(0), size=length, mode="linear", align_corners=False)
    return resized[0].t().to(table.dtype).contiguous()
