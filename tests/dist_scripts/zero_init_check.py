"""Partitioned-from-construction under ZeRO-3 (issue #13), run by every rank of a
`deepspeed --num_gpus N` launch (tests/test_zero_init_dist.py). Rank 0 writes `--out`/report.json,
the trained delta and the selection; the test compares them with one process that builds the model
the ordinary way (timm + the whole file), scores, applies sparse mode and trains on the same global
batches.

Every rank: builds test_vit inside deepspeed.zero.Init and fills its partitions from the
safetensors file (gps_ds.zero_init.build_partitioned); checks each tensor against the file by
gathering it alone; scores (ZeRO-3, CE loss) on its share of fixed global batches; applies sparse
mode to the partitioned weights; trains NB steps (SGD with momentum and weight decay) under ZeRO-3;
writes the gathered delta. Reported per rank: entries held and read, the largest single read,
whether every sparse base stayed partitioned, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from gps_ds.distributed import init_distributed  # noqa: E402

NB, B, IMG, CLASSES, K = 3, 12, 32, 1000, 2  # CLASSES = test_vit's pretrained class count: the file's head is kept
SCORE_BATCHES = 4
TRAIN = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}


def global_batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, 3, IMG, IMG, generator=g), torch.randint(0, 10, (B,), generator=g)) for _ in range(n)]


def local(batch, rank: int, world: int):
    x, y = batch
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def config(ckpt: str, world: int, offload: bool = False):
    from gps_ds.config import validate_config

    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return validate_config({
        "model": {"name": "test_vit", "img_size": IMG, "num_classes": CLASSES, "checkpoint": ckpt},
        "gps": {"k": K, "loss": "ce"},
        "train": {"method": "gps", **TRAIN},
        "deepspeed": {"train_micro_batch_size_per_gpu": B // world, "gradient_accumulation_steps": 1,
                      "steps_per_print": 10**9, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
                      "zero_optimization": zero},
    })


def file_errors(model: nn.Module, ckpt: str, rank: int) -> float:
    """Max |gathered parameter - file| over every tensor, each gathered alone (a collective)."""
    import deepspeed
    from safetensors import safe_open

    worst = 0.0
    with safe_open(ckpt, framework="pt") as f:
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    worst = max(worst, float((p.detach() - f.get_tensor(name)).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    ap.add_argument("--offload", action="store_true", help="ZeRO-3 parameter offload to CPU")
    args = ap.parse_args()
    rank, world = init_distributed()

    import deepspeed

    from gps_ds.engine import gathered_delta
    from gps_ds.methods import get_method
    from gps_ds.optim import build_optimizer
    from gps_ds.rules import classify
    from gps_ds.selection.pipeline import run_selection_zero
    from gps_ds.zero_init import build_partitioned

    cfg = config(args.ckpt, world, args.offload)
    t0 = time.perf_counter()
    model, twin, report = build_partitioned(cfg, cfg.deepspeed)
    seconds = {"build": time.perf_counter() - t0}
    rss_after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load_err = file_errors(model, args.ckpt, rank)
    seconds["check"] = time.perf_counter() - t0 - seconds["build"]

    roles = classify(twin)
    scored = [local(b, rank, world) for b in global_batches(SCORE_BATCHES, 11)]
    result = run_selection_zero(model, roles, scored, scheme="gps", k=K, loss="ce", ds_config=cfg.deepspeed)
    seconds["score"] = result.seconds
    t1 = time.perf_counter()
    prepared = get_method("gps").prepare(model, roles, result.selection, "sparse")
    seconds["sparse"] = time.perf_counter() - t1
    bases = [m.weight for m in model.modules() if hasattr(m, "gps_values")]
    values_whole = all(not hasattr(m.gps_values, "ds_id") for m in model.modules() if hasattr(m, "gps_values"))
    optimizer = build_optimizer(model, cfg.train)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=trainable,
                                           config=cfg.deepspeed)
    offload = {"engine_offload_param": bool(engine.zero_offload_param()),
               "base_partitions_on": sorted({str(p.ds_tensor.device) for p in bases})}
    losses = []
    for batch in global_batches(NB, 22):
        x, y = local(batch, rank, world)
        loss = nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    bases_partitioned = all(p.ds_status.name == "NOT_AVAILABLE" and p.numel() == 0 for p in bases)
    delta = gathered_delta(engine.module, prepared, {"model": "test_vit"}, rank)
    mine = {"rank": rank, "total": report.total, "local": report.local, "read": report.read,
            "largest_read": report.largest_read, "fresh": list(report.fresh), "bases": len(bases),
            "bases_partitioned": bases_partitioned, "values_ordinary_before_engine": values_whole,
            "peak_rss_kb_after_build": rss_after_build, "seconds": seconds, **offload}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        from safetensors.torch import save_file

        from gps_ds.delta import save_delta

        os.makedirs(args.out, exist_ok=True)
        save_delta(os.path.join(args.out, "delta.safetensors"), delta)
        save_file({n: t.contiguous() for n, t in result.selection.items()}, os.path.join(args.out, "selection.safetensors"))
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump({"world": world, "load_max_abs_err": load_err, "losses": losses, "ranks": everyone}, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
