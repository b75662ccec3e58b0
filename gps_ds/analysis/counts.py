"""Trainable parameters vs K (connections kept per neuron) across architectures, from shapes only
(models built on the meta device, no weights): the paper's Fig. 8 and Table 7.

Fig. 8 plots the learnable parameters without the task head; Table 7 quotes them with the head.
"""

from __future__ import annotations

from typing import Any, Sequence

from gps_ds.analysis.common import pyplot

#: label -> model name (SAM ViT-B through gps_ds.models)
DEFAULT_MODELS: dict[str, str] = {
    "ViT-B/16": "vit_base_patch16_224", "Swin-B": "swin_base_patch4_window7_224",
    "ConvNeXt-B": "convnext_base", "SAM ViT-B": "sam_vit_b",
}
DEFAULT_KS: tuple[int, ...] = (1, 2, 5, 10, 15, 20)
#: Supplementary Table 7 rows that name the architecture and class count (CIFAR-100: 100 classes),
#: learnable parameters in millions with the head, as printed (two decimals).
PAPER_TABLE7: tuple[dict[str, Any], ...] = (
    {"row": "CIFAR-100", "model": "vit_base_patch16_224", "k": 5, "num_classes": 100, "params_m": 0.58},
    {"row": "CIFAR-100 (Swin)", "model": "swin_base_patch4_window7_224", "k": 5, "num_classes": 100, "params_m": 0.82},
    {"row": "CIFAR-100 (ConvNeXt)", "model": "convnext_base", "k": 5, "num_classes": 100, "params_m": 0.78},
)


def _label(name: str) -> str:
    return next((label for label, model in DEFAULT_MODELS.items() if model == name), name)


def count_rows(model_name: str, ks: Sequence[int], num_classes: int) -> list[dict[str, Any]]:
    """One row per K: selected weights, tensors trained whole (biases, head, ...), the head alone,
    `learnable` = selected + whole - head (Fig. 8's quantity), the backbone size."""
    from gps_ds.count import count_parameters
    from gps_ds.models import create_model
    from gps_ds.rules import classify

    model = create_model(model_name, num_classes, device="meta")
    roles = classify(model)
    rows = []
    for k in ks:
        c = count_parameters(model, roles, k)
        g = c["gps"]
        learnable = g["selected"] + g["whole"] - g["head"]
        rows.append({"model": model_name, "label": _label(model_name), "family": c["family"], "k": k,
                     "selected": g["selected"], "whole": g["whole"], "head": g["head"], "biases": g["biases"],
                     "learnable": learnable, "with_head": g["total"], "backbone": c["backbone"],
                     "percent_of_backbone": round(100.0 * learnable / c["backbone"], 4)})
    return rows


def table7_check() -> list[dict[str, Any]]:
    """Our counts next to the paper's Table 7 rows (millions with the head, rounded as printed)."""
    out = []
    for ref in PAPER_TABLE7:
        ours = count_rows(ref["model"], [ref["k"]], ref["num_classes"])[0]["with_head"]
        out.append({**ref, "ours": ours, "ours_m": round(ours / 1e6, 2),
                    "match": round(ours / 1e6, 2) == ref["params_m"]})
    return out


def analyze_counts(models: Sequence[str], ks: Sequence[int], num_classes: int,
                   paper_check: bool = True) -> tuple[dict[str, Any], Any]:
    rows = [r for m in models for r in count_rows(m, ks, num_classes)]
    result: dict[str, Any] = {"num_classes": num_classes, "ks": list(ks), "rows": rows}
    if paper_check:
        result["table7"] = table7_check()
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for m in models:
        mine = [r for r in rows if r["model"] == m]
        ax.plot([r["k"] for r in mine], [r["learnable"] / 1e6 for r in mine], marker="o", label=_label(m))
    ax.set_xlabel("K (input connections kept per neuron)")
    ax.set_ylabel("learnable parameters (M, no head)")
    ax.set_title("GPS: learnable parameters vs K")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return result, fig


def format_table(result: dict[str, Any]) -> str:
    lines = ["| model | K | selected | whole (no head) | learnable (no head) | % of backbone |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['label']} | {r['k']} | {r['selected']:,} | {r['whole'] - r['head']:,} | "
                     f"{r['learnable']:,} | {r['percent_of_backbone']:.3f} |")
    if result.get("table7"):
        lines += ["", "| Table 7 row | K | paper (M, with head) | ours (M) | match |", "|---|---|---|---|---|"]
        for t in result["table7"]:
            lines.append(f"| {t['row']} | {t['k']} | {t['params_m']:.2f} | {t['ours_m']:.2f} ({t['ours']:,}) | "
                         f"{'yes' if t['match'] else 'NO'} |")
    return "\n".join(lines)
