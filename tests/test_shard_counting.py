"""Sample counts of remote shards: from the manifest (`_info.json`) the shard writer puts beside
them, else by reading each shard once overall, split over the ranks.

The shards are served by a local HTTP server that logs every request, so "read once" is counted
on the wire, not inferred. The true counts come from the writer's own numbers (independent of
the reading code under test).
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from gps_ds.data import shards as shardlib
from gps_ds.data.writer import INFO_NAME, Item, WriteOptions, write_dataset

SAMPLES = 23  # 4 shards of 6, 6, 6, 5
SHARD_SIZE = 6
DEADLINE_S = 120


class _Server:
    """`http.server` over one folder, recording each requested path."""

    def __init__(self, root: Path):
        self.requests: Counter[str] = Counter()
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):  # noqa: N802 - http.server's name
                requests[self.path.lstrip("/")] += 1
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A folder written by the shard writer: `train-00000{0..3}.tar` + `_info.json`."""
    root = tmp_path_factory.mktemp("served")
    rng = np.random.default_rng(0)
    items = [Item(f"img{i:03d}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), label=i % 3) for i in range(SAMPLES)]
    info = write_dataset(root / "set", {"train": items}, kind="test", classes=["a", "b", "c"],
                         options=WriteOptions(shard_size=SHARD_SIZE, progress=False, shuffle=False))
    names = [s["name"] for s in info["splits"]["train"]["shards"]]
    truth = [s["samples"] for s in info["splits"]["train"]["shards"]]
    assert truth == [6, 6, 6, 5] and sum(truth) == SAMPLES
    return root / "set", names, truth


@pytest.fixture
def server(written):
    folder, names, truth = written
    shardlib._fetch_manifest.cache_clear()
    srv = _Server(folder)
    yield srv, names, truth, folder
    srv.close()
    shardlib._fetch_manifest.cache_clear()


def _spec(url: str, names: list[str]) -> str:
    stem = names[0].rsplit("-", 1)[0]
    return f"{url}/{stem}-{{000000..{len(names) - 1:06d}}}.tar"


def test_remote_counts_come_from_the_manifest_without_opening_a_shard(server):
    srv, names, truth, _ = server
    spec = _spec(srv.url, names)
    shards = shardlib.resolve(spec)
    assert shards.counts == truth and shards.size == SAMPLES
    assert shards.info["num_classes"] == 3  # the manifest's other facts come along (num_classes)
    shardlib.resolve(spec)  # a second resolve (loaders resolve more than once) fetches nothing again
    assert dict(srv.requests) == {INFO_NAME: 1}
    assert shards.with_counts().counts == truth and dict(srv.requests) == {INFO_NAME: 1}


def test_without_a_manifest_each_shard_is_read_once_and_the_fallback_says_so(server, capsys):
    srv, names, truth, folder = server
    (folder / INFO_NAME).rename(folder / "hidden.json")
    try:
        shards = shardlib.resolve(_spec(srv.url, names))
        assert shards.counts == [None] * len(names) and shards.size is None
        counted = shards.with_counts()
    finally:
        (folder / "hidden.json").rename(folder / INFO_NAME)
    assert counted.counts == truth
    assert srv.requests == Counter({INFO_NAME: 1, **{n: 1 for n in names}})
    err = capsys.readouterr().err
    assert f"no {INFO_NAME} gives the sample counts of {len(names)} shard(s)" in err, err
    assert "reading each shard once" in err and "1 rank(s)" in err


def _rank_main(rank: int, world: int, init_file: str, spec: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    counts = shardlib.resolve(spec).with_counts().counts
    Path(out, f"rank{rank}.json").write_text(json.dumps(counts))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(DEADLINE_S + 30)
def test_ranks_share_the_counting_and_agree_exactly(server, tmp_path):
    """Two ranks, no manifest: every shard is fetched once in all (not once per rank), and both
    ranks end with the writer's exact counts (what equal steps and exactly-once evaluation need)."""
    srv, names, truth, folder = server
    (folder / INFO_NAME).rename(folder / "hidden.json")
    world = 2
    try:
        ctx = mp.start_processes(_rank_main, args=(world, str(tmp_path / "init"), _spec(srv.url, names), str(tmp_path)),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + DEADLINE_S
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    pytest.fail(f"{world} ranks did not finish in {DEADLINE_S} s (hang?)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
    finally:
        (folder / "hidden.json").rename(folder / INFO_NAME)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert results == [truth] * world
    assert srv.requests == Counter({INFO_NAME: world, **{n: 1 for n in names}}), srv.requests


def test_pipe_urls_have_no_manifest_to_look_for(written, tmp_path):
    folder, names, truth = written
    spec = [f"pipe:cat {folder / n}" for n in names]
    shards = shardlib.resolve(spec)
    assert shards.counts == [None] * len(names)
    assert shards.with_counts().counts == truth
    assert shardlib._manifest_url(spec[0]) is None
    assert shardlib._manifest_url("https://h/d/x-000001.tar") == f"https://h/d/{INFO_NAME}"
    assert os.path.isfile(folder / INFO_NAME)


def test_index_writes_the_manifest_that_spares_the_counting(server, tmp_path, capsys):
    """`gps-ds shards index` over shards without a manifest (another tool's, here served over
    HTTP): the manifest it writes, put beside the shards, gives the writer's counts with no shard
    opened; bad input is one line and exit 2."""
    from gps_ds.cli import run

    srv, names, truth, folder = server
    (folder / INFO_NAME).rename(folder / "hidden.json")
    try:
        spec = _spec(srv.url, names)
        out = tmp_path / INFO_NAME
        assert run(["shards", "index", str(out), "--split", f"train={spec}", "--num-classes", "3"]) == 0
        assert srv.requests == Counter({n: 1 for n in names})  # each shard read once
        written = json.loads(out.read_text())
        assert [s["samples"] for s in written["splits"]["train"]["shards"]] == truth
        assert [s["name"] for s in written["splits"]["train"]["shards"]] == names
        (folder / INFO_NAME).write_text(out.read_text())  # "upload" it beside the shards
        srv.requests.clear()
        shardlib._fetch_manifest.cache_clear()
        shards = shardlib.resolve(spec)
        assert shards.counts == truth and shards.info["num_classes"] == 3
        assert dict(srv.requests) == {INFO_NAME: 1}
        (folder / INFO_NAME).unlink()
        capsys.readouterr()
        assert run(["shards", "index", str(out), "--split", f"train={spec}"]) == 2  # exists
        assert run(["shards", "index", str(tmp_path / "x.json"), "--split", f"train={spec}"]) == 2  # wrong name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and "exists; pass --overwrite" in err[0] and f"must be named {INFO_NAME}" in err[1], err
    finally:
        (folder / "hidden.json").rename(folder / INFO_NAME)
