"""Elastic resume (issue #13, item 4), run by every rank of a `deepspeed --num_gpus N` launch
(tests/test_elastic_resume.py). One launch runs each ZeRO stage of `--stages` in turn.

Every stage: the same weights (`--ckpt`), selection (`--selection`, written by the test), sparse
mode, Adam with a decay and a no-decay group, `TOTAL` steps on fixed global batches (each rank its
slice). ZeRO-3: test_vit partitioned from construction (zero_init_check's set-up); ZeRO 1/2: the
model built the ordinary way (whole on every rank, as the trainer does below ZeRO-3), DeepSpeed
partitioning the fp32 masters and the optimizer state.
`--phase first`: `--first` steps, then `gps_ds.checkpoint.save_checkpoint` with the
world-size-independent trained state (gps_ds.elastic) into `--run`/stage<S>.
`--phase resume`: the same set-up at another world size, `check_elastic` + `load_elastic` from that
checkpoint; reported: how far the working copy, the full fp32 masters and the full optimizer state
(all gathered) are from the file right after the load; then the remaining steps, and rank 0 writes
`--out`/stage<S>/delta.safetensors (the gathered delta) and final.safetensors (`save_elastic`: the
full fp32 values, Adam moments and step counts after the last step). report.json also gives each
stage's seconds per part (set-up, load, check, train, save).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import zero_init_check as Z  # noqa: E402

from gps_ds.distributed import init_distributed  # noqa: E402

TOTAL = 6
TRAIN = {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.01}


def loaded_errors(engine, stored: dict[str, torch.Tensor], keys: list[str]) -> dict[str, float]:
    """Max |value - file| over the trained parameters: the working copy, the full fp32 master and
    each full optimizer state tensor (all gathered; collectives: every rank calls it)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    trained = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    err = {"param": 0.0, "fp32": 0.0, **{k: 0.0 for k in keys}}

    def gap(got: torch.Tensor, key: str, name: str) -> float:
        return float((got.detach().reshape(-1) - stored[f"{key}/{name}"].reshape(-1)).abs().max())

    with deepspeed.zero.GatheredParameters([p for _, p in trained], modifier_rank=None):  # no-op below ZeRO-3
        for n, p in trained:
            err["param"] = max(err["param"], gap(p, "param", n))
    for n, p in trained:
        err["fp32"] = max(err["fp32"], gap(safe_get_full_fp32_param(p), "param", n))
        for k in keys:
            err[k] = max(err[k], gap(safe_get_full_optimizer_state(p, k), k, n))
    return err


def run_stage(stage: int, args, rank: int, world: int) -> dict:
    import deepspeed
    from safetensors.torch import load_file

    from gps_ds.checkpoint import RunIdentity, TrainState, checkpoint_root, latest_tag, read_state, save_checkpoint
    from gps_ds.elastic import ELASTIC_FILE, check_elastic, elastic_reason, load_elastic, read_meta, save_elastic
    from gps_ds.engine import gathered_delta
    from gps_ds.methods import get_method
    from gps_ds.models import create_model
    from gps_ds.optim import build_optimizer
    from gps_ds.rules import classify
    from gps_ds.zero_init import build_partitioned

    t0 = time.perf_counter()
    cfg = Z.config(args.ckpt, world)  # ZeRO-3
    if stage == 3:
        ds = cfg.deepspeed
        model, twin, _ = build_partitioned(cfg, ds)
    else:
        ds = dict(cfg.deepspeed, zero_optimization={"stage": stage})
        model = twin = create_model("test_vit", Z.CLASSES, img_size=Z.IMG, checkpoint=args.ckpt)
    roles = classify(twin)
    selection = {n: t.long() for n, t in load_file(args.selection).items()}
    prepared = get_method("gps").prepare(model, roles, {n: selection[n] for n in roles.candidates}, "sparse")
    optimizer = build_optimizer(model, cfg.train)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=trainable, config=ds)
    batches = Z.global_batches(TOTAL, 22)
    run = Path(args.run) / f"stage{stage}"
    report: dict = {"world": world, "stage": stage, "seconds": {"setup": time.perf_counter() - t0}}
    if args.phase == "first":
        steps = range(args.first)
    else:
        tag = latest_tag(run)
        state, saved = read_state(run, tag)
        folder = checkpoint_root(run) / tag
        check_elastic(folder, state, saved["world_size"], world, elastic_reason(stage, "gps", "sparse"), Z.B)
        load_elastic(engine, folder / ELASTIC_FILE)
        report["seconds"]["load"] = time.perf_counter() - t0 - report["seconds"]["setup"]
        report["loaded_max_abs_err"] = loaded_errors(engine, load_file(str(folder / ELASTIC_FILE)),
                                                     read_meta(folder / ELASTIC_FILE)["keys"])
        steps = range(state.step, TOTAL)
        report["resumed_at_step"] = state.step
        report["seconds"]["check"] = time.perf_counter() - t0 - report["seconds"]["setup"] - report["seconds"]["load"]
    t1 = time.perf_counter()
    losses = []
    for i in steps:
        x, y = Z.local(batches[i], rank, world)
        loss = nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    report["losses"] = losses
    report["seconds"]["train"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    if args.phase == "first":
        identity = RunIdentity(world_size=world, method="gps", mode="sparse", k=Z.K, selection_sha256="",
                               fingerprint="")
        save_checkpoint(engine, run, TrainState(1, 0, args.first), identity, rank, elastic_meta={"global_batch": Z.B})
        report["seconds"]["save"] = time.perf_counter() - t1
        return report
    out = Path(args.out) / f"stage{stage}"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    delta = gathered_delta(engine.module, prepared, {"model": "test_vit"}, rank)
    save_elastic(engine, out / "final.safetensors", rank, {"global_batch": Z.B})
    if rank == 0:
        from gps_ds.delta import save_delta

        save_delta(str(out / "delta.safetensors"), delta)
    report["seconds"]["save"] = time.perf_counter() - t1
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=("first", "resume"), required=True)
    ap.add_argument("--stages", default="3", help="comma-separated ZeRO stages, run in turn")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--selection", required=True)
    ap.add_argument("--run", required=True, help="holds stage<S>/checkpoints/")
    ap.add_argument("--first", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    rank, world = init_distributed()
    Z.TRAIN.clear()
    Z.TRAIN.update(TRAIN)
    reports = [run_stage(int(s), args, rank, world) for s in args.stages.split(",")]
    if rank == 0 and args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(reports, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
