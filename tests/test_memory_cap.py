"""A model that one rank's memory cap cannot hold is scored and trained at 3 ranks and fails clearly
at 1 (issue #13, item 5).

Every rank runs in a memory cgroup of its own (`tests/dist_scripts/capped_train.py`) limited to
650 MiB; the cgroup charges what the rank allocates after importing torch + DeepSpeed + timm and
starting the process group (~0.85 GB on these CPU ranks, whatever the model), so the cap is on the
model's memory. Model: `vit_so150m_patch16_reg4_gap_256` at 32 px, 133.0 M parameters, 507 MiB in
fp32; scoring gives every weight a gradient, so one rank would need 1,015 MiB. At 3 ranks a rank
holds a third of the weights and of their gradients plus ZeRO-3's buffers: measured peak 583-585
MiB. At 1 rank gps-ds reads the cgroup's limit before building and refuses in one line (without
that check the kernel's OOM killer ends the rank with no message).

The issue's stricter goal, fp32 weights alone above the cap, is not met at 3 ranks: the scoring
peak is 2/3 of the weights plus ~245 MiB of gather, bucket and runtime buffers, 1.15x the weights
for this model (0.96-0.99x for ViT-L/16, within 3% of the cap; docs/distributed.md).

The ZeRO-3 settings are the small-buffer ones docs/distributed.md gives for models that do not fit
whole, and `MALLOC_MMAP_THRESHOLD_` is set as it advises for memory-bound CPU ranks.

Needs root and a writable memory cgroup (v1); skipped otherwise.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from dist_launch import DEADLINE_S, ROOT, cli_args, digits_trainer_settings, launch

MODEL, IMG, CLASSES = "vit_so150m_patch16_reg4_gap_256", 32, 10
BUDGET_MB = 650
SCRIPT = ROOT / "tests" / "dist_scripts" / "capped_train.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * DEADLINE_S)]


def _own_memory_cgroup() -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            return base if (base / "memory.limit_in_bytes").is_file() else None
    return None


@pytest.fixture(scope="module")
def cgroup():
    base = _own_memory_cgroup()
    if base is None or os.geteuid() != 0:
        pytest.skip("needs root and a cgroup-v1 memory controller")
    parent = base / f"gps-ds-test-{os.getpid()}"
    try:
        parent.mkdir()
    except OSError as err:
        pytest.skip(f"cannot create a memory cgroup under {base}: {err}")
    yield parent
    for child in sorted(parent.glob("rank*")):
        if child.is_dir():
            child.rmdir()  # the ranks have exited: the cgroups are empty
    parent.rmdir()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from gps_ds.data.datasets import write_digits
    from gps_ds.zero_init import write_random_weights

    root = tmp_path_factory.mktemp("cap")
    write_digits(root / "digits", test_size=48, seed=0, progress=False)
    weights = write_random_weights(MODEL, CLASSES, root / "weights.safetensors", img_size=IMG)
    return root, weights


def _weight_bytes(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            s = f.get_slice(key)
            n = 1
            for d in s.get_shape():
                n *= d
            total += n * 4 if s.get_dtype() == "F32" else 0
    return total


def _run(world: int, files, cgroup: Path, out: Path) -> tuple[int, str]:
    root, weights = files
    group = cgroup / out.name
    group.mkdir()
    sets = digits_trainer_settings(root / "digits", out, **{
        "model.name": MODEL, "model.checkpoint": str(weights), "gps.k": 1, "gps.loss": "ce", "gps.max_batches": 2,
        "train.epochs": 1, "data.steps_per_epoch": 2, "deepspeed.train_micro_batch_size_per_gpu": 8,
        "deepspeed.zero_optimization.stage": 3,
        "deepspeed.zero_optimization.stage3_param_persistence_threshold": 0,
        "deepspeed.zero_optimization.stage3_max_live_parameters": 4_000_000,
        "deepspeed.zero_optimization.stage3_prefetch_bucket_size": 2_000_000,
        "deepspeed.zero_optimization.reduce_bucket_size": 2_000_000,
        "deepspeed.zero_optimization.stage3_max_reuse_distance": 0})
    log = out.parent / f"{out.name}.log"
    rc = launch(world, [str(SCRIPT), *cli_args(sets)], log, check=False,
                env_extra={"GPS_DS_TEST_MODEL_BUDGET_MB": str(BUDGET_MB), "GPS_DS_TEST_CGROUP": str(group),
                           "MALLOC_MMAP_THRESHOLD_": "131072"})
    for child in group.glob("rank*"):
        child.rmdir()
    group.rmdir()
    return rc, log.read_text(errors="replace")


def test_one_rank_cannot_hold_the_weights_and_their_gradients(files):
    weights = _weight_bytes(files[1])
    assert 2 * weights > BUDGET_MB * 2**20 > weights  # 1,015 MiB > 650 MiB > 507 MiB


def test_scored_and_trained_at_three_capped_ranks(files, cgroup, tmp_path):
    from safetensors.torch import load_file

    from gps_ds.delta import load_delta

    rc, log = _run(3, files, cgroup, tmp_path / "three")
    assert rc == 0, log[-3000:]
    assert len(re.findall(rf"capped rank \d/3: memory cgroup rank\d limited to {BUDGET_MB} MB", log)) == 3
    for rank in range(3):
        assert re.search(rf"partitioned build, rank {rank}/3: holds \d+ of 133017738 parameter entries \(33\.3%\)", log)
    mask = load_file(str(tmp_path / "three" / "mask.safetensors"))
    # K=1: one selected input per output row of every candidate weight
    assert mask and all(t.shape[-1] == 1 for t in mask.values())
    delta = load_delta(tmp_path / "three" / "delta_last.safetensors")
    base = load_file(str(files[1]))
    moved = 0.0
    for name, (idx, values) in delta.selected.items():
        start = base[name].reshape(base[name].shape[0], -1).gather(1, idx.long())
        moved = max(moved, float((values.reshape(start.shape) - start).abs().max()))
    assert moved > 1e-4  # training moved the selected entries away from the weights file


def test_one_capped_rank_fails_in_one_line(files, cgroup, tmp_path):
    rc, log = _run(1, files, cgroup, tmp_path / "one")
    assert rc != 0
    errors = [ln for ln in log.splitlines() if ln.startswith("gps-ds train: error:")]
    assert len(errors) == 1, log[-3000:]
    assert "out of memory on rank 0 of 1" in errors[0] and "more ranks" in errors[0]
    assert "its parameters and their scoring gradients need 1,015 MB on this rank (all 507 MB, twice)" in errors[0]
    assert "(cgroup memory limit)" in errors[0]
    assert "Traceback" not in log
    assert not (tmp_path / "one" / "delta_last.safetensors").exists()
