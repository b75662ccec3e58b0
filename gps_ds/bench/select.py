"""`gps-ds bench select`: cost of the selection step.

* top-K: median wall time of the per-row top-K over all candidate weights, random scores
  (:func:`gps_ds.selection.bench.bench_topk`);
* scoring pass: forward + backward with only the candidates requiring gradients and the
  signed gradient summed over batches (:func:`gps_ds.selection.scoring.accumulate_scores`,
  no optimizer), against the same number of full fine-tuning steps (forward + backward +
  AdamW step) in the same process, alternated over rounds.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any


def _full_steps(model, x, y, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    t0 = time.perf_counter()
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    dt = time.perf_counter() - t0
    opt.zero_grad(set_to_none=True)
    return dt


def _scoring(model, x, y, steps: int, candidates: list[str]) -> float:
    import torch.nn.functional as F

    from gps_ds.selection.scoring import accumulate_scores

    def loss_fn(m, inputs, labels):
        return F.cross_entropy(m(inputs), labels)

    t0 = time.perf_counter()
    accumulate_scores(model, ((x, y) for _ in range(steps)), loss_fn, candidates)
    return time.perf_counter() - t0


def bench_select(model: str = "vit_base_patch16_224", k: int = 1, *, batch: int = 8, steps: int = 3,
                 rounds: int = 2, repeats: int = 5, threads: int | None = None, num_classes: int = 1000,
                 img_size: int | None = None, scoring: bool = True) -> dict[str, Any]:
    import torch

    from gps_ds.bench.common import OtherLoad, machine
    from gps_ds.models import create_model
    from gps_ds.rules import classify
    from gps_ds.selection.bench import bench_topk

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads or os.cpu_count() or 1)
    load_before = machine()["load_average"]
    with OtherLoad() as other:
        out: dict[str, Any] = {"benchmark": "select", "model": model, "k": k, "topk": bench_topk(model, k, repeats)}
        if scoring:
            torch.manual_seed(0)
            net = create_model(model, num_classes, img_size=img_size)
            candidates = classify(net).candidates
            size = img_size or 224
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(batch, 3, size, size, generator=gen)
            y = torch.randint(0, num_classes, (batch,), generator=gen)
            _scoring(net, x, y, 1, candidates)  # warm-up
            _full_steps(net, x, y, 1)
            score_t, full_t = [], []
            for r in range(rounds):
                pair = [(score_t, lambda: _scoring(net, x, y, steps, candidates)), (full_t, lambda: _full_steps(net, x, y, steps))]
                for sink, fn in (pair if r % 2 == 0 else pair[::-1]):
                    sink.append(fn())
            s, f = statistics.median(score_t), statistics.median(full_t)
            out["scoring"] = {"batch": batch, "steps": steps, "rounds": rounds, "input_size": size,
                              "candidates": len(candidates),
                              "scoring_s": s, "full_steps_s": f, "ratio": s / f if f else None,
                              "scoring_runs_s": score_t, "full_runs_s": full_t}
            out["topk_vs_scoring"] = out["topk"]["median_s"] / s if s else None
    mach = machine()
    mach["load_average_before"] = load_before
    mach["load_average_after"] = mach.pop("load_average")
    mach["other_load_cores"] = other.cores
    out["machine"] = mach
    return out


def format_table(result: dict[str, Any]) -> str:
    t = result["topk"]
    lines = ["| measurement | value |", "|---|---|",
             f"| per-row top-K over {t['tensors']} candidate tensors ({t['entries']:,} entries, K={t['k']}) "
             f"| {1e3 * t['median_s']:.1f} ms (median of {len(t['times_s'])}) |"]
    s = result.get("scoring")
    if s:
        lines += [f"| scoring pass, {s['steps']} batches of {s['batch']} (fwd + bwd, signed sum, no optimizer) "
                  f"| {s['scoring_s']:.2f} s |",
                  f"| full fine-tuning, {s['steps']} steps of {s['batch']} (fwd + bwd + AdamW) | {s['full_steps_s']:.2f} s |",
                  f"| scoring / full | {s['ratio']:.3f} |"]
    return "\n".join(lines)
