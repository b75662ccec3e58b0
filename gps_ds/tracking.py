"""MLflow tracking on rank 0 only, and progress bars on rank 0 only.

The embedded default is a `sqlite:///` store in the run's output folder (MLflow 3 refuses a bare
`./mlruns` file store), artifacts beside it; `tracking.uri` points at a server instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

MAX_PARAM_LEN = 6000


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def default_uri(output_dir: str | os.PathLike) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class Tracker:
    """Thin MLflow client wrapper; every method is a no-op unless `active` (rank 0, enabled)."""

    def __init__(self, *, enabled: bool, rank: int, output_dir: str | os.PathLike, uri: str | None = None,
                 experiment: str = "gps-ds", run_name: str | None = None, run_id: str | None = None) -> None:
        self.active = enabled and rank == 0
        self.run_id: str | None = None
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(output_dir)
        if experiment == "gps-ds":  # the config's default: let the environment name the experiment
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", experiment)
        if not self.active:
            return
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifacts = None
            if self.uri.startswith("sqlite:"):
                artifacts = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(experiment, artifact_location=artifacts)
        else:
            exp_id = exp.experiment_id
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active or not metrics:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def log_artifacts(self, paths: Iterable[str | os.PathLike], folder: str | None = None) -> None:
        if self.active:
            for p in paths:
                if Path(p).exists():
                    self.client.log_artifact(self.run_id, str(p), folder)

    def end(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


def progress(iterable=None, *, rank: int = 0, enabled: bool = True, **kwargs):
    """tqdm on rank 0 when stderr is a terminal; a plain pass-through elsewhere (batch logs such as
    Slurm's get the trainer's periodic plain lines instead of carriage-return bars)."""
    import sys

    if rank != 0 or not enabled or not sys.stderr.isatty():
        return iterable if iterable is not None else _NullBar()
    from tqdm import tqdm

    return tqdm(iterable, dynamic_ncols=True, leave=False, **kwargs)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
