"""Launched by tests/test_resume_dist.py under `deepspeed --num_gpus 2`: the Trainer with a loss
that turns NaN on rank 1 only (from its 4th batch). Every rank writes what stopped it to
--out-RANK.json: the error message, or "finished" (which would be the bug)."""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import gps_ds.data.transforms as transforms  # noqa: E402
from gps_ds.config import validate_config  # noqa: E402
from gps_ds.engine import Trainer  # noqa: E402
from gps_ds.evaluation import TrainingError  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    rank = int(os.environ["RANK"])
    real = transforms.build_train_criterion

    def poisoned(data_cfg):
        inner, calls = real(data_cfg), {"n": 0}

        def criterion(logits, target):
            calls["n"] += 1
            loss = inner(logits, target)
            return loss * float("nan") if rank == 1 and calls["n"] > 3 else loss
        return criterion

    transforms.build_train_criterion = poisoned
    cfg = validate_config(json.loads(open(args.config).read()))
    try:
        Trainer(cfg, show_progress=False).run()
        result = {"stopped": "finished"}
    except TrainingError as err:
        result = {"stopped": str(err)}
    with open(f"{args.out}-{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
