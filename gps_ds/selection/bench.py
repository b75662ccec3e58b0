"""Timing check for the per-row top-K (not a unit test).

``python -m gps_ds.selection.bench [model_name] [k]`` prints a JSON object.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import torch

from .topk import rowwise_topk

__all__ = ["candidate_shapes", "bench_topk"]

_NOT_CANDIDATES = ("pos_embed", "cls_token", "dist_token", "reg_token", "relative_position", "norm")


def candidate_shapes(model_name: str) -> dict[str, tuple[int, ...]]:
    """Shapes of a timm model's candidate weights, built on the meta device (no memory).

    Candidates as in the paper: every parameter with >= 2 dimensions except
    position embeddings, class/distillation tokens, relative-position tables, norms
    and the classifier head.  (A stand-alone approximation of the project's rules,
    good enough for timing.)
    """
    import timm

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False)
    head = str(getattr(model, "pretrained_cfg", {}).get("classifier", "head"))
    out: dict[str, tuple[int, ...]] = {}
    for name, p in model.named_parameters():
        if p.dim() < 2 or name == head or name.startswith(head + "."):
            continue
        if any(tok in name for tok in _NOT_CANDIDATES):
            continue
        out[name] = tuple(p.shape)
    return out


def bench_topk(model_name: str = "vit_base_patch16_224", k: int = 1, repeats: int = 5) -> dict[str, Any]:
    """Median wall time of :func:`rowwise_topk` over all candidate weights of a model.

    Scores are random fp32 of the candidates' shapes (reshaped to (rows, fan_in)).
    """
    shapes = candidate_shapes(model_name)
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(s, generator=gen).reshape(s[0], -1) for s in shapes.values()]
    rowwise_topk(scores[0], k)  # warm-up
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for s in scores:
            rowwise_topk(s, k)
        times.append(time.perf_counter() - t0)
    return {
        "model": model_name,
        "k": k,
        "tensors": len(scores),
        "entries": sum(s.numel() for s in scores),
        "selected": sum(s.shape[0] * k for s in scores),
        "threads": torch.get_num_threads(),
        "median_s": statistics.median(times),
        "times_s": times,
    }


if __name__ == "__main__":  # pragma: no cover
    name = sys.argv[1] if len(sys.argv) > 1 else "vit_base_patch16_224"
    kk = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    print(json.dumps(bench_topk(name, kk)))
