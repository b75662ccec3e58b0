"""bench_data: the training pipeline's throughput next to the decode-only limit."""

import json

import pytest

from gps_ds.data import synthetic as syn
from gps_ds.data.bench import bench_data
from gps_ds.data.cli import main as data_cli


def test_bench_data_reports_both_rates(tmp_path, capsys):
    syn.make_shards(tmp_path, [20, 12], size=(64, 48))
    spec = str(tmp_path / "shard-{000000..000001}.tar")
    result = bench_data(spec, workers=0, batches=3, batch_size=4, image_size=32)
    assert result["images"] == 12 and result["workers"] == 0 and result["corrupt"] == 0
    for key in ("loader_images_per_s", "loader_images_per_s_per_worker", "worker_cpu_images_per_s",
                "decode_only_images_per_s", "decode_transform_images_per_s"):
        assert result[key] > 0
    ratio = result["worker_cpu_images_per_s"] / result["decode_only_images_per_s"]
    assert result["ratio_worker_cpu_to_decode_only"] == pytest.approx(ratio, rel=0.01, abs=0.002)
    assert data_cli(["bench-data", spec, "--workers", "1", "--batches", "2", "--batch-size", "4",
                     "--image-size", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["workers"] == 1 and out["images"] == 8
