"""Elastic resume (issue #13, item 2), run by every rank of a `deepspeed --num_gpus N` launch
(tests/test_elastic_resume.py).

`--phase first`: test_vit partitioned from construction under ZeRO-3 (zero_init_check's set-up),
the selection of `--selection` (written by the test), sparse mode, Adam, `--first` steps on the
fixed global batches (each rank its slice), then `gps_ds.checkpoint.save_checkpoint` with the
world-size-independent trained state (gps_ds.elastic).
`--phase resume`: the same set-up at another world size, `check_elastic` + `load_elastic` from that
checkpoint, the trained parameters compared with the file (gathered), the remaining steps, and the
gathered delta written to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", choices=("first", "resume"), required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--selection", required=True)
    ap.add_argument("--run", required=True, help="the run folder holding checkpoints/")
    ap.add_argument("--first", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    rank, world = init_distributed()

    import deepspeed
    from safetensors.torch import load_file

    from gps_ds.checkpoint import RunIdentity, TrainState, checkpoint_root, latest_tag, read_state, save_checkpoint
    from gps_ds.elastic import ELASTIC_FILE, check_elastic, elastic_reason, load_elastic
    from gps_ds.engine import gathered_delta
    from gps_ds.methods import get_method
    from gps_ds.optim import build_optimizer
    from gps_ds.rules import classify
    from gps_ds.zero_init import build_partitioned

    Z.TRAIN.clear()
    Z.TRAIN.update(TRAIN)
    cfg = Z.config(args.ckpt, world)
    model, twin, _ = build_partitioned(cfg, cfg.deepspeed)
    roles = classify(twin)
    selection = {n: t.long() for n, t in load_file(args.selection).items()}
    prepared = get_method("gps").prepare(model, roles, {n: selection[n] for n in roles.candidates}, "sparse")
    optimizer = build_optimizer(model, cfg.train)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=trainable,
                                           config=cfg.deepspeed)
    batches = Z.global_batches(TOTAL, 22)
    run = Path(args.run)
    report: dict = {"world": world}
    if args.phase == "first":
        steps = range(args.first)
    else:
        tag = latest_tag(run)
        state, saved = read_state(run, tag)
        folder = checkpoint_root(run) / tag
        check_elastic(folder, state, saved["world_size"], world, elastic_reason(3, "gps", "sparse"), Z.B)
        load_elastic(engine, folder / ELASTIC_FILE)
        stored = load_file(str(folder / ELASTIC_FILE))
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            report["loaded_max_abs_err"] = max(
                float((p.detach() - stored[f"param/{n}"].reshape(p.shape)).abs().max())
                for n, p in model.named_parameters() if p.requires_grad)
        steps = range(state.step, TOTAL)
        report["resumed_at_step"] = state.step
    losses = []
    for i in steps:
        x, y = Z.local(batches[i], rank, world)
        loss = nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    report["losses"] = losses
    if args.phase == "first":
        identity = RunIdentity(world_size=world, method="gps", mode="sparse", k=Z.K, selection_sha256="",
                               fingerprint="")
        save_checkpoint(engine, run, TrainState(1, 0, args.first), identity, rank, elastic_meta={"global_batch": Z.B})
    delta = gathered_delta(engine.module, prepared, {"model": "test_vit"}, rank)
    if rank == 0 and args.out:
        from gps_ds.delta import save_delta

        os.makedirs(args.out, exist_ok=True)
        save_delta(os.path.join(args.out, "delta.safetensors"), delta)
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
