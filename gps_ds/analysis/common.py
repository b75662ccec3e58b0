"""What every analysis shares: reading selections (mask or delta files), writing PNG + JSON,
attaching them to an MLflow run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch


def read_selection(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`(name -> (rows, K) indices, metadata)` from a mask file (`gps-ds select`) or a delta file
    (`gps-ds train`); -1 pads rows of variable-count schemes. Anything else: one-line ValueError."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"selection file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{p}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
    if fmt == "gps-delta/1":
        from gps_ds.delta import load_delta

        delta = load_delta(p)
        return {n: idx.to(torch.int64) for n, (idx, _) in delta.selected.items()}, dict(delta.meta)
    if fmt == "gps-mask/1":
        from gps_ds.selection.maskfile import load_mask

        return load_mask(p)
    raise ValueError(f"{p}: format {fmt!r} is neither a mask (gps-mask/1) nor a delta (gps-delta/1) file")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_outputs(out: str | os.PathLike, name: str, result: Mapping[str, Any], fig) -> list[Path]:
    """`<out>/<name>.json` and `<out>/<name>.png` (the figure is closed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js, png = out / f"{name}.json", out / f"{name}.png"
    js.write_text(json.dumps(result, indent=1) + "\n")
    fig.savefig(png, dpi=120)
    pyplot().close(fig)
    return [js, png]


def log_to_mlflow(run_id: str | None, uri: str | None, paths: Iterable[str | os.PathLike],
                  folder: str = "analysis") -> None:
    """Attach `paths` to the existing MLflow run `run_id` (nothing when run_id is None)."""
    if run_id is None:
        return
    import logging

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("--mlflow-run needs --tracking-uri (or MLFLOW_TRACKING_URI), e.g. sqlite:///runs/x/mlflow.db")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"--mlflow-run {run_id}: no such run in {uri}") from None
    for p in paths:
        client.log_artifact(run_id, str(p), folder)


#: module names on the input side of a network: drawn before the numbered blocks
INPUT_SIDE = ("patch_embed", "stem", "conv_stem", "conv1", "bn1", "embeddings")


def block_of(name: str) -> str:
    """The block a parameter belongs to: its path up to the first numeric component
    ("blocks.3", "layers.1", "image_encoder.blocks.7"), else its module path without the layer
    ("patch_embed", "head", "image_encoder.patch_embed")."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[: max(1, len(parts) - 2)])


def block_order(block: str) -> tuple:
    """Sort key in network order: input-side modules, numbered blocks by number (blocks.2 before
    blocks.10), then the rest (norms, heads, decoders). Files store tensors by name, not in model order."""
    parts = block.split(".")
    rank = 0 if any(p in INPUT_SIDE for p in parts) else 1 if any(p.isdigit() for p in parts) else 2
    return (rank, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))


def in_network_order(selection: dict) -> dict:
    """`selection` with its tensors re-ordered by (block, name) in network order."""
    return {n: selection[n] for n in sorted(selection, key=lambda n: (block_order(block_of(n)), n))}
