"""MLflow tracking on rank 0 only, and progress bars on rank 0 only.

The embedded default is a `sqlite:///` store in the run's output folder (MLflow 3 refuses a bare
`./mlruns` file store), artifacts beside it; `tracking.uri` points at a server instead.

Every MLflow call after the run is created goes through one background thread, so a slow or
unreachable tracking server never holds up a training step: metrics queued back to back are sent
as one `log_batch`, artifacts are snapshotted (hard-linked) when logged so a file rewritten later
still uploads as it was, and a failure is reported once on stderr and never stops the run.
`end()` (also on failure) waits for what is queued.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

MAX_PARAM_LEN = 6000
#: how long `Tracker.end` waits for queued MLflow calls (a server that stopped answering)
END_TIMEOUT_S = float(os.environ.get("GPS_DS_MLFLOW_END_TIMEOUT", "300"))


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
    """Thin MLflow client wrapper; every method is a no-op unless `active` (rank 0, enabled).

    Creating the run is synchronous (its id is needed at once); everything after it is queued to
    a worker thread (`background=False`: done in the caller's thread, for tools and tests)."""

    def __init__(self, *, enabled: bool, rank: int, output_dir: str | os.PathLike, uri: str | None = None,
                 experiment: str = "gps-ds", run_name: str | None = None, run_id: str | None = None,
                 background: bool = True) -> None:
        self.active = enabled and rank == 0
        self.run_id: str | None = None
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(output_dir)
        self.errors = 0  # failed MLflow calls (the first one is reported on stderr)
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._ended = False
        if experiment == "gps-ds":  # the config's default: let the environment name the experiment
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", experiment)
        if not self.active:
            return
        from mlflow.tracking import MlflowClient

        # after the import: importing mlflow sets its loggers to INFO ("Creating initial MLflow database tables")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)

        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self._staging = Path(output_dir) / ".mlflow-staging"
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
        if background:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._work, name="gps-ds-mlflow", daemon=True)
            self._thread.start()
            atexit.register(self._drain_at_exit)

    # -- the calls (queued) -------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self._submit(_PARAMS, items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # when it was measured, not when it is sent
        self._submit(_METRICS, [Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            for k, v in tags.items():
                self._submit(_CALL, (self.client.set_tag, (self.run_id, k, str(v))))

    def log_artifacts(self, paths: Iterable[str | os.PathLike], folder: str | None = None) -> None:
        """Each existing file as it is now (snapshotted; uploaded in the background)."""
        if not self.active:
            return
        for p in paths:
            p = Path(p)
            if p.is_file():
                self._submit(_ARTIFACT, (self._snapshot(p), folder))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far has been sent (or has failed); False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._queue is not None and self._queue.unfinished_tasks and self._thread.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def end(self, status: str = "FINISHED") -> None:
        """Send what is queued, mark the run `status`, stop the worker. Never raises."""
        if not self.active or self.run_id is None or self._ended:
            return
        self._ended = True
        self._submit(_CALL, (self.client.set_terminated, (self.run_id, status)))
        if self._queue is not None:
            self._queue.put(None)
            self._thread.join(END_TIMEOUT_S)
            if self._thread.is_alive():
                print(f"gps-ds: MLflow at {self.uri} did not take the run's last {self._queue.qsize()} calls within "
                      f"{END_TIMEOUT_S:.0f} s (GPS_DS_MLFLOW_END_TIMEOUT); the files are in the output folder",
                      file=sys.stderr, flush=True)
                return
        shutil.rmtree(self._staging, ignore_errors=True)

    def _drain_at_exit(self, timeout_s: float = 60.0) -> None:
        """A process leaving without `end()` (an error before the run loop) still sends what it queued."""
        if not self._ended and self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout_s)

    # -- the worker -------------------------------------------------------------------------------
    def _submit(self, kind: str, payload: Any) -> None:
        if self._queue is None:
            self._run([(kind, payload)])
        else:
            self._queue.put((kind, payload))

    def _work(self) -> None:
        pending = None
        while True:
            item = pending if pending is not None else self._queue.get()
            pending = None
            if item is None:
                self._queue.task_done()
                return
            batch = [item]
            if item[0] == _METRICS:  # whatever metrics queued meanwhile go in the same request
                while len(batch) < 50:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None or nxt[0] != _METRICS:
                        pending = nxt
                        break
                    batch.append(nxt)
            try:
                self._run(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _run(self, batch: list[tuple[str, Any]]) -> None:
        kind = batch[0][0]
        try:
            if kind == _METRICS:
                metrics = [m for _, ms in batch for m in ms]
                for i in range(0, len(metrics), 1000):  # MLflow's per-request limit
                    self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
            elif kind == _PARAMS:
                self.client.log_batch(self.run_id, params=batch[0][1])
            elif kind == _ARTIFACT:
                path, folder = batch[0][1]
                try:
                    self.client.log_artifact(self.run_id, str(path), folder)
                finally:
                    if self._staging in path.parents:
                        shutil.rmtree(path.parent, ignore_errors=True)
            else:
                fn, args = batch[0][1]
                fn(*args)
        except Exception as err:  # never fatal: tracking is a record of the run, not the run
            self.errors += 1
            if self.errors == 1:
                print(f"gps-ds: MLflow logging to {self.uri} failed ({type(err).__name__}: "
                      f"{str(err).splitlines()[0][:300] if str(err) else ''}); the run goes on, "
                      f"further MLflow errors are not shown", file=sys.stderr, flush=True)

    def _snapshot(self, path: Path) -> Path:
        """A hard link (a copy where links fail) under the staging folder, with the file's own name:
        files are replaced atomically (delta, metrics), so the link keeps this version."""
        if self._queue is None:
            return path
        self._staging.mkdir(parents=True, exist_ok=True)
        slot = Path(tempfile.mkdtemp(dir=self._staging))
        target = slot / path.name
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
        return target


_METRICS, _PARAMS, _ARTIFACT, _CALL = "metrics", "params", "artifact", "call"


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
