"""Figures: selected parameters per block (the paper's Fig. 9)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch


def per_block_counts(selection: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Selected entries per block ("blocks.3", "layers.1", "patch_embed", ...), in model order."""
    counts: dict[str, int] = {}
    for name, idx in selection.items():
        parts = name.split(".")
        block = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        counts[block] = counts.get(block, 0) + int((idx >= 0).sum())
    return counts


def plot_selection_distribution(selection: Mapping[str, torch.Tensor], path: str | os.PathLike,
                                title: str = "GPS: selected parameters per block") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = per_block_counts(selection)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(counts)), 3.6))
    ax.bar(range(len(counts)), list(counts.values()), color="#3b75af")
    ax.set_xticks(range(len(counts)), list(counts), rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("selected weights")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
