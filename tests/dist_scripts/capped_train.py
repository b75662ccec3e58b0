"""`deepspeed --num_gpus N tests/dist_scripts/capped_train.py ARGS`: `launchers/train.py ARGS` on
ranks whose memory is capped by the kernel.

Each rank first imports what the trainer runs on (torch, DeepSpeed, timm, gps_ds) and starts the
process group, then moves itself into a memory cgroup of its own, ``$GPS_DS_TEST_CGROUP/rank<R>``,
limited to ``GPS_DS_TEST_MODEL_BUDGET_MB``: what the rank may use for the model, its data and
DeepSpeed's buffers (a cgroup charges only what a process allocates after it joins, so the libraries
are left out). Past the limit the kernel reclaims and then kills the rank, as a GPU runs out of
memory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def vm_data_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status")


def main() -> None:
    import deepspeed  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401

    import gps_ds.engine  # noqa: F401
    from gps_ds.cli import launcher_main
    from gps_ds.distributed import init_distributed

    rank, world = init_distributed()  # the trainer finds it started
    budget = int(float(os.environ["GPS_DS_TEST_MODEL_BUDGET_MB"]) * 2**20)
    group = Path(os.environ["GPS_DS_TEST_CGROUP"]) / f"rank{rank}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(budget))
    (group / "cgroup.procs").write_text(str(os.getpid()))
    print(f"capped rank {rank}/{world}: memory cgroup {group.name} limited to {budget / 2**20:.0f} MB, "
          f"{vm_data_bytes() / 2**20:.0f} MB of libraries and process group left out", file=sys.stderr, flush=True)
    launcher_main("train", sys.argv[1:])


if __name__ == "__main__":
    main()
