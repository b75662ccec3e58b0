"""Build the backbone a config names: a timm model (optionally with local weights), or a SAM."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn


class ModelError(ValueError):
    pass


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool | str = False,
    checkpoint: str | None = None,
    drop_path_rate: float = 0.0,
    img_size: int | None = None,
    kwargs: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    grad_checkpointing: bool = False,
) -> nn.Module:
    """timm model `name` with a fresh `num_classes` head; `checkpoint` is a local weights file
    (.safetensors or .pth, loaded with weights_only) whose head and position embedding timm adapts.
    `device="meta"` builds shapes only (for counting). `grad_checkpointing` recomputes the
    backbone's blocks in the backward pass.

    `sam_small`, `sam_vit_b`, `sam_vit_l`, `sam_vit_h` build a `SamSegmenter` (binary masks;
    `num_classes` is ignored) whose weights come only from `checkpoint`."""
    from gps_ds.models.sam import SAM_MODEL_NAMES, create_sam

    if name in SAM_MODEL_NAMES:
        return create_sam(name, pretrained=pretrained, checkpoint=checkpoint, drop_path_rate=drop_path_rate,
                          img_size=img_size, kwargs=kwargs, device=device, grad_checkpointing=grad_checkpointing)
    model = _create_timm_model(name, num_classes, pretrained=pretrained, checkpoint=checkpoint,
                               drop_path_rate=drop_path_rate, img_size=img_size, kwargs=kwargs, device=device)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _create_timm_model(name: str, num_classes: int, *, pretrained: bool | str, checkpoint: str | None,
                       drop_path_rate: float, img_size: int | None, kwargs: dict[str, Any] | None,
                       device: str | torch.device | None) -> nn.Module:
    import timm
    from safetensors import SafetensorError

    if not timm.is_model(name):
        raise ModelError(f"unknown model.name '{name}' (not a timm model, nor one of sam_small, sam_vit_b, "
                         f"sam_vit_l, sam_vit_h)")
    extra = dict(kwargs or {})
    if img_size is not None:
        extra["img_size"] = img_size
    if drop_path_rate:
        extra["drop_path_rate"] = drop_path_rate
    use_weights = bool(pretrained) or checkpoint is not None
    if pretrained and checkpoint is None and device != "meta":
        _check_hub_reachable(name if not isinstance(pretrained, str) else f"{name}.{pretrained}")
    if checkpoint is not None:
        from pathlib import Path

        if not Path(checkpoint).is_file():
            raise ModelError(f"model.checkpoint: file not found: {checkpoint}")
        extra["pretrained_cfg_overlay"] = dict(file=checkpoint)
    if isinstance(pretrained, str):
        name = f"{name}.{pretrained}"
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    try:
        with ctx:
            return timm.create_model(name, pretrained=use_weights and device != "meta", num_classes=num_classes, **extra)
    except (RuntimeError, OSError, ValueError, SafetensorError) as err:
        what = f"model.checkpoint {checkpoint}" if checkpoint else f"weights for '{name}'"
        raise ModelError(f"cannot load {what}: {str(err).splitlines()[0]}") from None


def _hub_cached(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(hub_id, f), str)
               for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))


def _hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _check_hub_reachable(full_name: str) -> None:
    """Fail in seconds, not after the hub client's ~50 s of retries, when weights cannot come."""
    import os

    import timm

    cfg = timm.models.get_pretrained_cfg(full_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hub_id and _hub_cached(hub_id):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline or not _hub_reachable():
        raise ModelError(f"model.pretrained: no cached weights for '{full_name}' and the Hugging Face hub "
                         f"cannot be reached; set model.checkpoint to a local .safetensors/.pth file")


def create_model_from_config(cfg, device: str | torch.device | None = None) -> nn.Module:
    """The model of a full `gps_ds.config.Config`; the class count comes from `model.num_classes`,
    else from the data section (`data.num_classes` or the training shards' _info.json).

    Weights not loaded from a checkpoint (the new head, or everything when training from
    scratch) are drawn right after seeding with `train.seed`, so evaluation and delta merging
    can rebuild exactly the base a run started from."""
    from gps_ds.models.sam import SAM_MODEL_NAMES

    m = cfg.model
    num_classes = m.num_classes
    if num_classes is None:
        from gps_ds.data.loaders import resolve_num_classes

        # SAM predicts one binary mask: no class count to look up.
        num_classes = 1 if m.name in SAM_MODEL_NAMES else resolve_num_classes(cfg.data)
        m.num_classes = num_classes
    torch.manual_seed(cfg.train.seed)
    return create_model(
        m.name, num_classes, pretrained=m.pretrained, checkpoint=m.checkpoint,
        drop_path_rate=m.drop_path_rate, img_size=m.img_size, kwargs=m.kwargs, device=device,
        grad_checkpointing=m.grad_checkpointing,
    )
