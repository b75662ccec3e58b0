"""Reading and writing plain weight files safely: safetensors, or torch.load(weights_only=True)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class WeightsError(ValueError):
    pass


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from .safetensors or .pth/.pt/.bin (never unpickling code).
    Common wrappers ({"model": ...}, {"state_dict": ...}) are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to parse is a bad file for the user
        raise WeightsError(f"checkpoint {path} is unreadable or corrupt: {str(err).splitlines()[0][:200]}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"checkpoint {path} does not hold a name -> tensor state dict")
    return state


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a .safetensors file atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
