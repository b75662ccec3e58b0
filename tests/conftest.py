import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
# The venv's ninja first, as under `make test`: DeepSpeed rebuilds its CPU op when the ninja changes.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's 8x8 digits written as shards (75/25 split, seed 0)."""
    from gps_ds.data.datasets import write_digits

    out = tmp_path_factory.mktemp("data") / "digits"
    write_digits(out, test_size=0.25, seed=0, progress=False)
    return out


def _deepspeed_shm_segments() -> set[str]:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return set()
    return {p.name for p in shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")}


@pytest.fixture(scope="session", autouse=True)
def no_deepspeed_shm_left():
    """Every DeepSpeed run of the suite (launcher, Slurm, ranks started directly) must leave no
    shared-memory allreduce segment behind (gps_ds.distributed.release_shm_workspace)."""
    before = _deepspeed_shm_segments()
    yield
    left = sorted(_deepspeed_shm_segments() - before)
    assert not left, f"DeepSpeed shared-memory segments left in /dev/shm by the test session: {left}"
