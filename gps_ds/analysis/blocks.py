"""Per-block distribution of two selections (the paper's Fig. 9: GPS spreads its entries over the
whole network, a network-wide top-k ("net") piles them into the last blocks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from gps_ds.analysis.common import block_of, block_order, in_network_order, pyplot
from gps_ds.plots import plot_selection_distribution


def per_block_counts(selection: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Selected (>= 0) entries per block."""
    counts: dict[str, int] = {}
    for name, idx in selection.items():
        counts[block_of(name)] = counts.get(block_of(name), 0) + int((idx >= 0).sum())
    return counts


def compare_blocks(selections: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """Per block (network order, union of the selections' blocks): count and share (%) per selection."""
    counts = {label: per_block_counts(sel) for label, sel in selections.items()}
    blocks = sorted({b for c in counts.values() for b in c}, key=block_order)
    totals = {label: sum(c.values()) for label, c in counts.items()}
    rows = []
    for b in blocks:
        row: dict[str, Any] = {"block": b}
        for label, c in counts.items():
            n = c.get(b, 0)
            row[label] = n
            row[f"{label}_percent"] = round(100.0 * n / totals[label], 4) if totals[label] else 0.0
        rows.append(row)
    return {"labels": list(selections), "totals": totals, "blocks": rows}


def plot_blocks(result: dict[str, Any], title: str = "selected entries per block"):
    plt = pyplot()
    labels, rows = result["labels"], result["blocks"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(rows)), 3.8))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r[f"{label}_percent"] for r in rows], width, label=f"{label} ({result['totals'][label]:,})")
    ax.set_xticks(range(len(rows)), [r["block"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("share of the selection (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def single_plots(selections: Mapping[str, Mapping[str, torch.Tensor]], out: str | Path) -> list[Path]:
    """The existing Fig. 9 panel (gps_ds.plots) for each selection on its own (tensors handed over in
    network order, which that panel keeps)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    safe = lambda s: "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in s)  # noqa: E731
    return [plot_selection_distribution(in_network_order(dict(sel)), out / f"blocks-{safe(label)}.png", title=f"{label}: selected per block")
            for label, sel in selections.items()]
