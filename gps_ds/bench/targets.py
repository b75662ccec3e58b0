"""The performance targets (issue #6) checked against a benchmark result: met, or missed by how much.

Ratios are against full fine-tuning measured in the same run; step time is the wall-clock median.
"""

from __future__ import annotations

from typing import Any

# (model, batch, K) -> [(method, measurement, at most this ratio to full)]
TRAIN_TARGETS: dict[tuple[str, int, int], list[tuple[str, str, float]]] = {
    ("vit_base_patch16_224", 4, 1): [("gps-sparse", "step_s", 0.72), ("gps-sparse", "peak_bytes", 0.70),
                                     ("gps-sparse", "state_bytes", 0.01)],
    ("vit_small_patch16_224", 16, 1): [("gps-sparse", "step_s", 0.80)],
    ("vit_small_patch16_224", 16, 2): [("gps-sparse", "step_s", 0.80)],
    ("vit_small_patch16_224", 16, 10): [("gps-sparse", "step_s", 1.0)],
}
# (model, K) -> top-K seconds, scoring / full ratio
SELECT_TARGETS = {("vit_base_patch16_224", 1): (1.0, 1.15)}
LABELS = {"step_s": "step time", "peak_bytes": "peak memory", "state_bytes": "trainable state"}


def _verdict(measured: float, limit: float) -> str:
    if measured <= limit:
        return "met"
    return f"**missed** by {measured - limit:.3f} ({100 * (measured / limit - 1):.1f}% over)"


def _table(rows: list[tuple[str, str, str]]) -> str:
    if not rows:
        return ""
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in rows]
    return "\n".join(lines)


SAM_MODELS = ("sam_vit_b", "sam_vit_l", "sam_vit_h")
SAM_FROZEN_BOUND_SLACK = 1.05  # issue #11: gps-sparse peak within 5% of the frozen-weights bound


def train_targets(result: dict[str, Any]) -> str:
    """A markdown table of the targets that apply to this `bench train` result ('' if none)."""
    res = result["results"]
    rows = []
    if result["model"] in SAM_MODELS and "gps-sparse" in res and "bitfit" in res:
        ratio = res["gps-sparse"]["peak_bytes"] / res["bitfit"]["peak_bytes"]
        rows.append((f"gps-sparse peak memory <= {SAM_FROZEN_BOUND_SLACK:g}x the frozen-weights bound (bitfit: "
                     "encoder biases + decoder)", f"{ratio:.3f}x", _verdict(ratio, SAM_FROZEN_BOUND_SLACK)))
    for method, key, limit in TRAIN_TARGETS.get((result["model"], result["batch"], result["k"]), []):
        if method in res and res[method]["ratio"][key] is not None:
            ratio = res[method]["ratio"][key]
            verdict = _verdict(ratio, limit)
            if key == "state_bytes" and ratio > limit and "linear" in res:
                verdict += f"; the classifier head alone (`linear`) is {res['linear']['ratio'][key]:.4f}x"
            rows.append((f"{method} {LABELS[key]} <= {limit:g}x full", f"{ratio:.3f}x", verdict))
    if "gps-sparse" in res and "frozen" in res and rows and res["frozen"]["step_s"]:
        frozen = res["frozen"]
        rows.append(("gps-sparse step time over the frozen-weights limit (context, no target)",
                     f"{res['gps-sparse']['step_s'] / frozen['step_s']:.3f}x (limit {frozen['ratio']['step_s']:.3f}x full)",
                     "-"))
    if "gps-sparse" in res and "lora" in res and rows:
        for key in ("step_s", "peak_bytes"):
            mine, lora = res["gps-sparse"]["ratio"][key], res["lora"]["ratio"][key]
            rows.append((f"gps-sparse {LABELS[key]} below LoRA's", f"{mine:.3f}x vs {lora:.3f}x",
                         "met" if mine < lora else f"**missed** by {mine - lora:.3f}"))
    return _table(rows)


def select_targets(result: dict[str, Any]) -> str:
    limits = SELECT_TARGETS.get((result["model"], result["k"]))
    if limits is None:
        return ""
    rows = [("per-row top-K over all candidates <= 1 s", f"{result['topk']['median_s']:.3f} s",
             _verdict(result["topk"]["median_s"], limits[0]))]
    if result.get("scoring"):
        ratio = result["scoring"]["ratio"]
        rows.append((f"scoring pass <= {limits[1]:g}x full steps", f"{ratio:.3f}x", _verdict(ratio, limits[1])))
    return _table(rows)
