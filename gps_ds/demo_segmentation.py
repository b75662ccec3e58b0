"""The demo's segmentation stage: SAM-style polyp segmentation in miniature, offline.

Data: `digits-seg` shards (real MNIST digits painted on crops of real photos; the mask is the
digit's shape). A small SAM built from segment-anything's modeling classes (64 px) is first
trained in full on one digits-seg set (a stand-in for SAM's own pre-training, which no package
ships), then fine-tuned on a second, smaller set with gps, decoder-only and full fine-tuning;
the best epoch is picked on validation and test (mDice / mIoU per image at the original
resolution) is evaluated once. Learning rates are fixed, not tuned.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

SAM = {"name": "sam_small", "img_size": 64, "kwargs": {"embed_dim": 32, "depth": 2, "prompt_dim": 32}}
LR = {"gps": 3e-3, "decoder": 3e-3, "full": 1e-3}


def _config(root: Path, shards: Path, method: str, out: str, epochs: int, lr: float, **model: Any) -> dict:
    return {
        "model": {**SAM, **model},
        "data": {"train": str(shards), "val": str(shards), "test": str(shards), "recipe": "segmentation",
                 "image_size": 64, "workers": 0, "hflip": 0.5},
        "gps": {"k": 1, "loss": "task"},
        "train": {"method": method, "epochs": epochs, "lr": lr, "optimizer": "adam", "min_lr": 1e-5},
        "task": {"pictures": 2},
        "deepspeed": {"train_micro_batch_size_per_gpu": 8},
        "tracking": {"uri": f"sqlite:///{(root / 'mlflow.db').resolve()}", "experiment": "gps-ds-demo",
                     "run_name": out.replace("/", "-")},
        "output": {"dir": str(root / out), "overwrite": True, "checkpoints": False},
    }


def run_segmentation_stage(root: str | Path = "runs/demo", pretrain_size: int = 300, size: int = 200,
                           pretrain_epochs: int = 6, epochs: int = 6) -> list[dict]:
    from gps_ds.config import validate_config
    from gps_ds.data.datasets import write_digits_seg
    from gps_ds.delta import load_delta, merge_state_dict
    from gps_ds.engine import train
    from gps_ds.models import create_model_from_config
    from gps_ds.seeding import seed_everything
    from gps_ds.weights import save_state_dict

    root = Path(root)
    start = time.perf_counter()
    big, small = root / "shards" / "digits-seg-pretrain", root / "shards" / "digits-seg"
    if not (big / "_info.json").exists():
        write_digits_seg(big, size=pretrain_size, val_size=0.1, test_size=0.1, seed=1, progress=False)
    if not (small / "_info.json").exists():
        write_digits_seg(small, size=size, val_size=0.2, test_size=0.3, seed=2, progress=False)
    print(f"stage 3: pre-training a small SAM in full on {pretrain_size} digits-seg images ...", flush=True)
    cfg = validate_config(_config(root, big, "full", "stage3-seg/pretrain", pretrain_epochs, 1e-3))
    cfg.data.val = None
    train(cfg, overwrite=True, show_progress=False)
    seed_everything(cfg.train.seed)
    ckpt = root / "pretrained" / "sam_small_digits_seg.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    base = create_model_from_config(cfg).state_dict()
    save_state_dict(merge_state_dict(base, load_delta(root / "stage3-seg" / "pretrain" / "delta_last.safetensors")),
                    ckpt)
    rows = []
    for method, lr in LR.items():
        print(f"stage 3: fine-tuning on {size} other digits-seg images with {method} ...", flush=True)
        s = train(validate_config(_config(root, small, method, f"stage3-seg/{method}", epochs, lr,
                                          checkpoint=str(ckpt))), overwrite=True, show_progress=False)
        rows.append({"method": method, "lr": lr, "val_mdice": s["val"]["mdice"], "mdice": s["test"]["mdice"],
                     "miou": s["test"]["miou"], "trained": s["trainable"]["total"], "seconds": s["seconds"]})
    print()
    print(format_table(rows))
    print(f"\nsegmentation stage {time.perf_counter() - start:.0f} s; pictures: {root}/stage3-seg/<method>/pictures/")
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| method | lr | val mDice | test mDice | test mIoU | trained parameters | wall time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['val_mdice']:.4f} | {r['mdice']:.4f} | {r['miou']:.4f} | "
                     f"{r['trained']:,} | {r['seconds']:.0f} |")
    return "\n".join(lines)
