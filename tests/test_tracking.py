"""MLflow off the training thread (gps_ds.tracking.Tracker): what is logged arrives, a slow server
never blocks the caller, failures are reported once and never raise, artifacts upload as they
were when logged. File store in tmp."""

import os
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from gps_ds.tracking import Tracker


def _tracker(tmp_path, **kw) -> Tracker:
    return Tracker(enabled=True, rank=0, output_dir=tmp_path / "out", uri=(tmp_path / "mlruns").as_uri(),
                   experiment="t", run_name="r", **kw)


def _read_artifact(uri: str, run_id: str, name: str, tmp_path) -> str:
    return open(MlflowClient(uri).download_artifacts(run_id, name, str(tmp_path)), encoding="utf-8").read()


def test_background_logging_reaches_mlflow(tmp_path):
    t = _tracker(tmp_path)
    assert t._thread is not None and t._thread.is_alive()
    t.log_params({"train": {"lr": 0.1, "method": "gps"}})
    for step in range(25):
        t.log_metrics({"train_loss": 1.0 / (step + 1), "images_per_s": 100.0 + step}, step)
    art = tmp_path / "config.json"
    art.write_text('{"a": 1}')
    t.log_artifacts([art, tmp_path / "missing.txt"])
    t.set_tags({"note": "x"})
    t.end("FINISHED")
    assert not t._thread.is_alive() and t.errors == 0
    client = MlflowClient(t.uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.lr": "0.1", "train.method": "gps"}
    assert run.data.tags["note"] == "x"
    loss = sorted((m.step, m.value) for m in client.get_metric_history(t.run_id, "train_loss"))
    assert loss == [(s, 1.0 / (s + 1)) for s in range(25)]
    assert [a.path for a in client.list_artifacts(t.run_id)] == ["config.json"]
    assert _read_artifact(t.uri, t.run_id, "config.json", tmp_path) == '{"a": 1}'
    assert not (tmp_path / "out" / ".mlflow-staging").exists()


def test_a_slow_server_never_blocks_the_caller_and_metrics_go_in_batches(tmp_path):
    t = _tracker(tmp_path)
    real = t.client.log_batch
    calls = []

    def slow(run_id, metrics=(), params=(), **kw):
        calls.append(len(metrics))
        time.sleep(0.3)
        return real(run_id, metrics=metrics, params=params, **kw)

    t.client.log_batch = slow
    started = time.perf_counter()
    for step in range(20):
        t.log_metrics({"train_loss": float(step)}, step)
    queued = time.perf_counter() - started
    assert queued < 0.25  # 20 calls would take 6 s in the caller's thread
    t.end()
    assert sum(calls) == 20 and len(calls) < 20  # queued while the first request ran: sent together
    assert len(MlflowClient(t.uri).get_metric_history(t.run_id, "train_loss")) == 20


def test_failures_are_reported_once_and_never_raise(tmp_path, capsys):
    t = _tracker(tmp_path)

    def broken(*args, **kwargs):
        raise ConnectionError("tracking server down\nsecond line")

    t.client.log_batch = broken
    t.client.log_artifact = broken
    for step in range(3):
        t.log_metrics({"train_loss": 1.0}, step)
        t.flush()
    art = tmp_path / "a.txt"
    art.write_text("x")
    t.log_artifacts([art])
    t.end("FAILED")  # does not raise
    err = capsys.readouterr().err
    assert t.errors == 4
    assert err.count("MLflow logging") == 1 and len(err.splitlines()) == 1
    assert "(ConnectionError: tracking server down)" in err
    assert MlflowClient(t.uri).get_run(t.run_id).info.status == "FAILED"  # later calls still go through


def test_an_artifact_uploads_as_it_was_when_logged(tmp_path):
    t = _tracker(tmp_path)
    gate = threading.Event()
    t._submit("call", (gate.wait, (10,)))  # holds the worker until the file has been replaced
    best = tmp_path / "delta_best.safetensors"
    best.write_text("epoch 1")
    t.log_artifacts([best])
    tmp = tmp_path / "new"
    tmp.write_text("epoch 2")
    os.replace(tmp, best)  # as save_delta writes: a new file renamed over the old one
    gate.set()
    t.end()
    assert _read_artifact(t.uri, t.run_id, "delta_best.safetensors", tmp_path / "dl") == "epoch 1"


@pytest.mark.parametrize("rank, enabled", [(1, True), (0, False)])
def test_only_rank_0_with_tracking_enabled_logs(tmp_path, rank, enabled):
    t = Tracker(enabled=enabled, rank=rank, output_dir=tmp_path / "out", uri=(tmp_path / "mlruns").as_uri())
    t.log_metrics({"x": 1.0}, 0)
    t.end()
    assert not t.active and t.run_id is None and t._thread is None and not (tmp_path / "mlruns").exists()


def test_a_new_store_is_created_without_mlflow_info_lines(tmp_path):
    """Importing mlflow sets its loggers to INFO; the tracker quiets them after the import (fresh process)."""
    import subprocess
    import sys

    code = ("from gps_ds.tracking import Tracker; import sys; "
            "t = Tracker(enabled=True, rank=0, output_dir=sys.argv[1]); t.log_metrics({'a': 1.0}, 0); t.end()")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and (tmp_path / "out" / "mlflow.db").is_file()
    assert done.stderr == "" and done.stdout == "", done.stderr
