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
