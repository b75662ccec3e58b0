"""Throughput of the training pipeline next to the decode-only limit on the same shards.

Two views of "per worker": the loader's wall-clock rate divided by its workers (what a
run sees, but shared cores and other load distort it), and the worker pipeline run in
this process timed by CPU time (what one worker costs, robust to other load). The
decode-only limit is PIL decoding of the same JPEGs in a tight loop, also CPU-timed.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch
from webdataset.tariterators import tarfile_samples

from .config import DataConfig
from .decode import image_bytes, open_image
from .loaders import make_train_loader
from .shards import resolve
from .transforms import build_train_transform


def _first_images(urls: Sequence[str], n: int) -> list[bytes]:
    out: list[bytes] = []
    for sample in tarfile_samples({"url": u} for u in urls):
        try:
            out.append(image_bytes(sample))
        except KeyError:
            continue
        if len(out) == n:
            break
    return out


def _cpu_rate(run: Callable[[], int]) -> float:
    """Items per CPU-second of ``run`` (which returns how many it processed), one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        t0 = time.process_time()
        n = run()
        return n / max(time.process_time() - t0, 1e-9)
    finally:
        torch.set_num_threads(threads)


def decode_only(images: Sequence[bytes], transform: Optional[Callable[[Any], Any]] = None, repeat: int = 2) -> float:
    """Images per CPU-second of PIL decoding (to RGB) in a tight loop over ``images``;
    with ``transform``, decoding followed by that transform."""

    def run() -> int:
        for _ in range(repeat):
            for data in images:
                img = open_image(data)
                if transform is not None:
                    transform(img)
        return repeat * len(images)

    return _cpu_rate(run)


def bench_data(shards: Union[str, Sequence[str]], workers: int = 1, batches: int = 50, batch_size: int = 32,
               recipe: str = "fgvc", image_size: int = 224, split: str = "train",
               cfg: Optional[DataConfig] = None, rounds: int = 3) -> dict[str, Any]:
    """Measure the training loader (``recipe``'s train transform, ``batches`` batches of
    ``batch_size``) with ``workers`` DataLoader workers by wall clock, the same worker
    pipeline in this process by CPU time, and PIL decoding of the same JPEGs (alone, and
    followed by timm's train transform on the fully decoded image) by CPU time."""
    cfg = cfg or DataConfig(train=shards, train_split=split, recipe=recipe, image_size=image_size,
                            workers=workers, steps_per_epoch=batches + 1, shuffle_buffer=100)
    loader = make_train_loader(cfg, rank=0, world_size=1, batch_size_per_rank=batch_size)
    it = iter(loader)
    next(it)  # worker start-up is not timed
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in it)
    wall = n / (time.perf_counter() - t0)

    # one-process rates by CPU time, interleaved over a few rounds (best of each) so that
    # changing load on shared machines shifts them alike
    stream = make_train_loader(cfg.model_copy(update={"workers": 0}), 0, 1, batch_size).dataset
    images = _first_images(resolve(shards, split).urls, min(n, 512))
    reference = build_train_transform(cfg.model_copy(update={"fast_crop": False}), uint8=True)
    worker_cpu = limit = with_transform = 0.0
    for _ in range(rounds):
        worker_cpu = max(worker_cpu, _cpu_rate(lambda: sum(len(y) for _, y in stream)))
        limit = max(limit, decode_only(images))
        with_transform = max(with_transform, decode_only(images, transform=reference, repeat=1))
    per_worker = wall / max(1, workers)
    return {
        "workers": workers,
        "batch_size": batch_size,
        "batches": batches,
        "images": n,
        "recipe": cfg.recipe,
        "image_size": cfg.size,
        "fast_crop": cfg.fast_crop,
        "loader_images_per_s": round(wall, 1),
        "loader_images_per_s_per_worker": round(per_worker, 1),
        "worker_cpu_images_per_s": round(worker_cpu, 1),
        "decode_only_images_per_s": round(limit, 1),
        "decode_transform_images_per_s": round(with_transform, 1),
        "ratio_worker_cpu_to_decode_only": round(worker_cpu / limit, 3),
        "ratio_per_worker_to_decode_only": round(per_worker / limit, 3),
        "corrupt": loader.counter.total,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
