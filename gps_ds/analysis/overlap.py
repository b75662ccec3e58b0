"""Overlap of the selections of several tasks (the paper's Fig. 12): an entry is shared when the
same (parameter, row, column) is selected. Exact region counts (which tasks selected an entry),
Jaccard per parameter and per block, and a Venn-style figure for 2 or 3 tasks."""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Mapping, Sequence

import torch

from gps_ds.analysis.common import block_of, block_order, pyplot


def entry_codes(idx: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Flat positions row * fan_in + column of the valid (>= 0) entries."""
    idx = idx.long()
    rows = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)
    valid = idx >= 0
    return rows[valid] * fan_in + idx[valid]


def region_counts(codes: Sequence[torch.Tensor]) -> torch.Tensor:
    """`out[m]` = number of entries selected by exactly the tasks whose bits are set in m (m >= 1)."""
    n = len(codes)
    if not any(c.numel() for c in codes):
        return torch.zeros(2 ** n, dtype=torch.long)
    allc = torch.cat([c.unique() for c in codes])
    bits = torch.cat([torch.full((c.unique().numel(),), 1 << t, dtype=torch.long) for t, c in enumerate(codes)])
    uniq, inv = allc.unique(return_inverse=True)
    member = torch.zeros(uniq.numel(), dtype=torch.long).index_add_(0, inv, bits)  # distinct bits: sum == OR
    return torch.bincount(member, minlength=2 ** n)


def _summary(regions: torch.Tensor, labels: Sequence[str]) -> dict[str, Any]:
    n = len(labels)
    per_task = [int(sum(regions[m] for m in range(1, 2 ** n) if m >> t & 1)) for t in range(n)]
    union = int(regions[1:].sum())
    inter = int(regions[2 ** n - 1])
    pair = {}
    for a, b in combinations(range(n), 2):
        both = int(sum(regions[m] for m in range(1, 2 ** n) if m >> a & 1 and m >> b & 1))
        either = int(sum(regions[m] for m in range(1, 2 ** n) if m >> a & 1 or m >> b & 1))
        pair[f"{labels[a]}|{labels[b]}"] = round(both / either, 6) if either else None
    return {"per_task": dict(zip(labels, per_task)), "union": union, "shared_by_all": inter,
            "jaccard_all": round(inter / union, 6) if union else None, "jaccard_pairs": pair}


def compute_overlap(selections: Mapping[str, Mapping[str, torch.Tensor]],
                    fan_in: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Totals, regions (keyed by the '+'-joined task labels), per-parameter and per-block overlap.
    `fan_in` per parameter is only needed to encode positions; by default the widest index + 1
    seen in any task (positions are then still unique within a parameter)."""
    labels = list(selections)
    if len(labels) < 2:
        raise ValueError("overlap needs at least two selections")
    names: list[str] = []
    for sel in selections.values():
        names += [n for n in sel if n not in names]
    total = torch.zeros(2 ** len(labels), dtype=torch.long)
    per_param, per_block = [], {}
    for name in names:
        idxs = [sel.get(name) for sel in selections.values()]
        shapes = {tuple(i.shape[:1]) for i in idxs if i is not None}
        if len(shapes) > 1:
            raise ValueError(f"selections disagree on the rows of '{name}': {sorted(shapes)}")
        width = (fan_in or {}).get(name) or 1 + max([int(i.max()) for i in idxs if i is not None and i.numel()] + [0])
        codes = [entry_codes(i, width) if i is not None else torch.zeros(0, dtype=torch.long) for i in idxs]
        regions = region_counts(codes)
        total += regions
        per_param.append({"parameter": name, **_summary(regions, labels)})
        b = block_of(name)
        per_block[b] = per_block.get(b, torch.zeros_like(regions)) + regions
    result = {"labels": labels, **_summary(total, labels), "regions": _regions(total, labels),
              "per_block": [{"block": b, **_summary(per_block[b], labels)} for b in sorted(per_block, key=block_order)],
              "per_parameter": per_param}
    return result


def _regions(regions: torch.Tensor, labels: Sequence[str]) -> dict[str, int]:
    return {"+".join(labels[t] for t in range(len(labels)) if m >> t & 1): int(regions[m])
            for m in range(1, 2 ** len(labels))}


def plot_overlap(result: dict[str, Any]):
    """Venn-style circles (equal sizes, exact counts in each region) for 2-3 tasks, next to the
    Jaccard index per block; with more tasks only the Jaccard panel."""
    plt = pyplot()
    labels = result["labels"]
    venn = len(labels) <= 3
    fig, axes = plt.subplots(1, 2 if venn else 1, figsize=(11.0 if venn else 7.0, 4.2),
                             gridspec_kw={"width_ratios": [1, 1.4]} if venn else None)
    axes = list(axes) if venn else [axes]
    if venn:
        _draw_venn(axes[0], result)
    ax = axes[-1]
    blocks = result["per_block"]
    ax.plot(range(len(blocks)), [b["jaccard_all"] or 0 for b in blocks], marker="o", label="all tasks")
    ax.set_xticks(range(len(blocks)), [b["block"] for b in blocks], rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Jaccard (shared / union)")
    ax.set_title("overlap per block")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _draw_venn(ax, result: dict[str, Any]) -> None:
    from matplotlib.patches import Circle

    labels = result["labels"]
    n = len(labels)
    centers = [(-0.5, 0.0), (0.5, 0.0)] if n == 2 else [(-0.5, 0.35), (0.5, 0.35), (0.0, -0.5)]
    colors = ["#3b75af", "#ef8636", "#519e3e"]
    for (x, y), c, label in zip(centers, colors, labels):
        ax.add_patch(Circle((x, y), 0.9, alpha=0.3, color=c))
        above = y >= 0 and n == 3 or n == 2
        ax.text(x * 1.6, y + (0.95 if above else -1.0), f"{label}: {result['per_task'][label]:,}",
                ha="center", va="bottom" if above else "top", fontsize=9)
    total = max(result["union"], 1)
    for m in range(1, 2 ** n):
        members = [t for t in range(n) if m >> t & 1]
        inside = [centers[t] for t in members]
        outside = [centers[t] for t in range(n) if t not in members]
        x = sum(c[0] for c in inside) / len(inside)
        y = sum(c[1] for c in inside) / len(inside)
        for ox, oy in outside:  # push away from circles the region is not in
            dx, dy = x - ox, y - oy
            d = math.hypot(dx, dy) or 1.0
            x, y = x + 0.45 * dx / d, y + 0.45 * dy / d
        key = "+".join(labels[t] for t in members)
        count = result["regions"][key]
        ax.text(x, y, f"{count:,}\n{100 * count / total:.1f}%", ha="center", va="center", fontsize=8)
    ax.set_xlim(-1.8, 1.8)
    ax.set_ylim(-1.9, 1.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"selected entries ({result['union']:,} in the union)")
