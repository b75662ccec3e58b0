"""Multi-rank CPU runs (torch.distributed, gloo, spawned processes): equal training steps
on every rank and exactly-once evaluation, with 5 shards of uneven size."""

import json
import math
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gps_ds.data import synthetic as syn
from gps_ds.data.fewshot import scan_labels
from gps_ds.data.shards import resolve

SIZES = [7, 1, 12, 3, 9]  # 32 samples
TRAIN_BATCH, EVAL_BATCH = 3, 4
DEADLINE_S = 150


def _rank_main(rank, world, init_file, spec, out_dir, workers):
    from gps_ds.data import DataConfig, count_correct, make_eval_loader, make_train_loader, reduce_accuracy

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    cfg = DataConfig(train=spec, test=spec, recipe="vtab", image_size=8, workers=workers, shuffle_buffer=4)

    train = make_train_loader(cfg, batch_size_per_rank=TRAIN_BATCH)  # rank and world size from torch.distributed
    steps = []
    for epoch in range(2):
        n = 0
        for x, y in train:
            t = torch.tensor([len(y)])
            dist.all_reduce(t)  # one collective per step: a rank with fewer steps would hang here
            assert t.item() == TRAIN_BATCH * world
            n += 1
        steps.append(n)

    evaluate = make_eval_loader(cfg, rank, world, EVAL_BATCH)
    keys, correct, count = [], 0, 0
    for batch in evaluate:
        t = torch.tensor([1])
        dist.all_reduce(t)
        # a fake model: right on samples whose key ends in an even digit, wrong on the others
        right = torch.tensor([k[-1:].isdigit() and int(k[-1]) % 2 == 0 for k in batch.keys])
        pred = torch.where(right, batch.targets, (batch.targets + 1) % 3)
        c, n = count_correct(torch.nn.functional.one_hot(pred, 3).float(), batch.targets, batch.valid)
        correct, count = correct + c, count + n
        keys += [k for k, v in zip(batch.keys, batch.valid.tolist()) if v]
    total_correct, total_count = reduce_accuracy(correct, count)
    gathered = [None] * world
    dist.all_gather_object(gathered, keys)
    result = {"len_train": len(train), "steps": steps, "len_eval": len(evaluate), "keys": keys,
              "all_keys": [k for ks in gathered for k in ks], "total": [total_correct, total_count],
              "corrupt": train.counter.total + evaluate.counter.total}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _run(world, workers, tmp_path, spec):
    out = tmp_path / f"out{world}"
    out.mkdir()
    ctx = mp.start_processes(_rank_main, args=(world, str(tmp_path / f"init{world}"), spec, str(out), workers),
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
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    syn.make_shards(folder, SIZES, classes=3, size=(12, 10))
    return str(folder / "shard-{000000..000004}.tar")


@pytest.mark.timeout(DEADLINE_S + 30)
@pytest.mark.parametrize("world,workers", [
    (2, 0),
    pytest.param(3, 2, marks=pytest.mark.slow),  # 3 ranks x 2 workers > 5 shards; ~35 s on 2 busy cores
])
def test_equal_steps_and_exactly_once_eval(world, workers, spec, tmp_path):
    results = _run(world, workers, tmp_path, spec)
    keys = [k for shard in scan_labels(resolve(spec).urls) for k, _ in shard]
    assert len(keys) == sum(SIZES)

    steps = math.ceil(sum(SIZES) / (TRAIN_BATCH * world))
    assert [r["len_train"] for r in results] == [steps] * world
    assert [r["steps"] for r in results] == [[steps, steps]] * world
    eval_batches = math.ceil(math.ceil(sum(SIZES) / world) / EVAL_BATCH)
    assert [r["len_eval"] for r in results] == [eval_batches] * world

    seen = [k for r in results for k in r["keys"]]
    assert sorted(seen) == sorted(keys) and len(set(seen)) == len(seen)  # once each, none missing
    assert all(sorted(r["all_keys"]) == sorted(keys) for r in results)
    expect_correct = sum(1 for k in keys if int(k[-1]) % 2 == 0)
    assert all(r["total"] == [expect_correct, len(keys)] for r in results)  # exact reduction
    assert all(r["corrupt"] == 0 for r in results)


def test_metric_helpers_without_distributed():
    from gps_ds.data import count_correct, reduce_accuracy, reduce_sums

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    targets = torch.tensor([0, 0, 0, 1])
    assert count_correct(logits, targets) == (3, 4)
    assert count_correct(logits, targets, torch.tensor([True, True, False, False])) == (1, 2)  # padding left out
    assert count_correct(logits, torch.nn.functional.one_hot(targets, 2).float()) == (3, 4)
    assert reduce_accuracy(7, 9) == (7, 9)
    assert reduce_sums([3, 2.5, torch.tensor(4)]) == [3, 2.5, 4]
