"""Training-step and selection benchmarks (`gps-ds bench train`, `gps-ds bench select`)."""

from gps_ds.bench.train import METHODS, bench_train
from gps_ds.bench.select import bench_select

__all__ = ["METHODS", "bench_train", "bench_select"]
