"""`gps-ds eval --suite imagenet-robustness`: one fine-tuned ImageNet-1k model (base + delta) on
ImageNet-A and -R (top-1 with the logits restricted to the subset's 200 classes) and ImageNet-C
(top-1 per corruption and severity, CE per corruption and mCE normalised by AlexNet)."""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch
import torch.nn as nn

from gps_ds.robustness.metrics import CORRUPTIONS, SEVERITIES, corruption_errors

SUITES = ("imagenet-robustness",)


@torch.no_grad()
def top1(model: nn.Module, loader, subset: Sequence[int] | None, device: torch.device) -> tuple[float, int]:
    """Top-1 (%) and sample count over an exactly-once eval loader; with `subset`, the prediction
    is the arg-max over those classes only (ImageNet-A/R protocol). Counts are summed over ranks."""
    from gps_ds import distributed as D

    keep = torch.tensor(sorted(subset), device=device) if subset is not None else None
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        x, y, valid = batch[0].to(device), batch[1].to(device), batch[2].to(device).bool()
        logits = model(x.float())
        pred = keep[logits[:, keep].argmax(1)] if keep is not None else logits.argmax(1)
        sums[0] += ((pred == y) & valid).sum()
        sums[1] += valid.sum()
    sums = D.all_reduce_(sums)
    correct, count = float(sums[0]), int(sums[1])
    if count == 0:
        raise ValueError("an evaluation split holds no samples")
    return 100.0 * correct / count, count


def _read_info(folder: str, kind: str) -> dict[str, Any]:
    from pathlib import Path

    p = Path(folder) / "_info.json"
    info = json.loads(p.read_text()) if p.is_file() else {}
    if info.get("kind") != kind:
        raise ValueError(f"--{kind} {folder}: not an {kind} shard folder (write it with gps-ds shards {kind})")
    return info


def _loader(cfg, folder: str, split: str, batch: int, rank: int, world: int):
    from gps_ds.data.loaders import make_eval_loader

    data = cfg.data.model_copy(update={"test": folder, "test_split": split})
    return make_eval_loader(data, rank, world, batch_size_per_rank=batch, split="test")


def evaluate_suite(cfg, delta_path: str, imagenet_a: str | None = None, imagenet_r: str | None = None,
                   imagenet_c: str | None = None, log=lambda msg: None) -> dict[str, Any]:
    from gps_ds import distributed as D
    from gps_ds.multitask import model_with_delta

    if not (imagenet_a or imagenet_r or imagenet_c):
        raise ValueError("--suite imagenet-robustness: give at least one of --imagenet-a, --imagenet-r, --imagenet-c")
    rank, world = D.init_distributed()
    device = D.accelerator_device()
    _, model, delta = model_with_delta(cfg, delta_path)
    model = model.to(device)
    classes = getattr(model, "num_classes", None)
    if classes != 1000:
        raise ValueError(f"--suite imagenet-robustness needs an ImageNet-1k head (1000 classes); "
                         f"model.num_classes is {classes}")
    batch = int(cfg.deepspeed.get("train_micro_batch_size_per_gpu", 32))
    out: dict[str, Any] = {"suite": "imagenet-robustness", "delta": str(delta_path), "model": cfg.model.name,
                           "method": delta.meta.get("method")}
    for key, folder, kind in (("imagenet_a", imagenet_a, "imagenet-a"), ("imagenet_r", imagenet_r, "imagenet-r")):
        if folder is None:
            continue
        info = _read_info(folder, kind)
        acc, n = top1(model, _loader(cfg, folder, "test", batch, rank, world), info["subset_indices"], device)
        out[key] = {"top1": acc, "count": n, "classes": len(info["subset_indices"])}
        log(f"{kind}: top-1 {acc:.2f} on {n} images")
    if imagenet_c is not None:
        info = _read_info(imagenet_c, "imagenet-c")
        errors: dict[str, dict[int, float]] = {}
        per_split = {}
        for split in info["splits"]:
            corruption, _, severity = split.rpartition("-")
            acc, n = top1(model, _loader(cfg, imagenet_c, split, batch, rank, world), None, device)
            per_split[split] = {"top1": acc, "count": n}
            errors.setdefault(corruption, {})[int(severity)] = 1.0 - acc / 100.0
            log(f"imagenet-c {split}: top-1 {acc:.2f} on {n} images")
        ce = corruption_errors(errors)
        complete = set(errors) == set(CORRUPTIONS) and all(set(v) == set(SEVERITIES) for v in errors.values())
        out["imagenet_c"] = {"mce": sum(ce.values()) / len(ce), "ce": ce, "splits": per_split,
                             "complete": complete, "corruptions": len(errors)}
    return json.loads(json.dumps(out))

