"""Readers in one process: step counts, exactly-once evaluation (ranks simulated in-process;
the real multi-process check is test_data_distributed.py), scoring pass, few-shot, URLs."""

import math
from collections import Counter

import pytest
import torch

from gps_ds.data import (DataConfig, EvalBatch, datasets, make_eval_loader, make_score_loader, make_train_loader,
                         resolve_num_classes, select_few_shot)
from gps_ds.data import synthetic as syn
from gps_ds.data.fewshot import scan_labels
from gps_ds.data.shards import resolve

SIZES = [7, 1, 12, 3, 9]  # 32 samples, uneven shards
CLASSES = 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    syn.make_shards(folder, SIZES, classes=CLASSES)
    return str(folder / "shard-{000000..000004}.tar")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("written")
    syn.make_imagefolder(root / "src", classes=CLASSES, per_class=[6, 4, 5])
    datasets.write_imagefolder(root / "src", root / "out", shard_size=4, progress=False)
    return str(root / "out")


def _cfg(spec, **kw):
    base = dict(train=spec, test=spec, recipe="vtab", image_size=16, workers=0, shuffle_buffer=8)
    base.update(kw)
    return DataConfig(**base)


def _all_keys(spec):
    return [k for shard in scan_labels(resolve(spec).urls) for k, _ in shard]


def _eval_keys(loader):
    valid, padded = [], 0
    for batch in loader:
        assert isinstance(batch, EvalBatch)
        valid += [k for k, v in zip(batch.keys, batch.valid.tolist()) if v]
        padded += int((~batch.valid).sum())
    return valid, padded


def test_train_steps_and_batches(shards):
    cfg = _cfg(shards)
    loader = make_train_loader(cfg, rank=0, world_size=1, batch_size_per_rank=5)
    assert len(loader) == math.ceil(32 / 5)
    batches = list(loader)
    assert len(batches) == 7
    x, y = batches[0]
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.max() < CLASSES
    # simulated ranks: every rank gets the same length, whatever its shards
    lens = {len(make_train_loader(cfg, rank=r, world_size=3, batch_size_per_rank=4)) for r in range(3)}
    assert lens == {math.ceil(32 / 12)}
    assert len(make_train_loader(_cfg(shards, steps_per_epoch=11), 0, 2, 4)) == 11
    assert len(make_train_loader(_cfg(shards, train_size=1000), 0, 2, 4)) == 125


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [2, 3])
def test_train_workers_share_the_steps(shards, workers):
    # 3 workers x 2 ranks > 1 shard: resampling keeps every worker busy
    cfg = _cfg(shards.replace("{000000..000004}", "000001"), workers=workers, steps_per_epoch=5)
    loader = make_train_loader(cfg, rank=1, world_size=2, batch_size_per_rank=3)
    assert len(loader) == 5 and sum(1 for _ in loader) == 5


def test_train_order_is_seeded_and_changes_per_epoch(shards):
    def labels(seed, epochs=2):
        loader = make_train_loader(_cfg(shards, seed=seed), 0, 1, 4)
        return [torch.cat([y for _, y in loader]).tolist() for _ in range(epochs)]

    a, b = labels(0), labels(0)
    assert a == b  # same seed, same stream
    assert a[0] != a[1]  # next epoch, new order
    assert labels(1)[0] != a[0]


@pytest.mark.parametrize("workers,layouts", [
    (0, ((1, 5), (2, 4), (3, 4), (5, 3), (40, 1))),  # (ranks, batch); 40 ranks > 32 samples
    (2, ((3, 4),)),
])
def test_eval_exactly_once_across_simulated_ranks(shards, workers, layouts):
    keys = _all_keys(shards)
    assert len(keys) == 32
    for world, batch in layouts:
        seen, lens = [], set()
        for rank in range(world):
            loader = make_eval_loader(_cfg(shards, workers=workers), rank, world, batch)
            got, padded = _eval_keys(loader)
            lens.add(len(loader))
            assert len(got) + padded == len(loader) * batch
            seen += got
        assert len(lens) == 1, (world, lens)  # same number of batches on every rank
        assert Counter(seen) == Counter(keys), (world, batch)  # each sample once, none missing


def test_eval_targets_match_labels(written):
    cfg = _cfg(written, test_split="train")
    labels = dict(pair for shard in scan_labels(resolve(written, "train").urls) for pair in shard)
    for batch in make_eval_loader(cfg, 0, 1, 4):
        for key, target, valid in zip(batch.keys, batch.targets.tolist(), batch.valid.tolist()):
            if valid:
                assert labels[key] == target


def test_eval_pads_to_equal_batches():
    from gps_ds.data.exact_stream import rank_plan, worker_plan

    # 5 samples, 2 ranks, batch 2: rank 0 has 2, rank 1 has 3 -> both run 2 batches
    assert rank_plan(5, 0, 2, 2, False) == (0, 2, 2)
    assert rank_plan(5, 1, 2, 2, False) == (2, 5, 2)
    assert rank_plan(10, 1, 3, 4, True) == (0, 0, 0)
    assert rank_plan(25, 2, 3, 4, True) == (16, 24, 2)
    # worker blocks of whole batches, covering the rank's range
    blocks = [worker_plan(2, 5, 2, 2, w, 3) for w in range(3)]
    assert blocks == [(2, 2, 0), (2, 4, 2), (4, 5, 2)]


def test_score_loader_one_pass_two_views(shards):
    keys_total = 32
    for world, batch in ((1, 5), (3, 3)):
        lens = set()
        for rank in range(world):
            loader = make_score_loader(_cfg(shards, image_size=24), rank, world, batch)
            lens.add(len(loader))
            n = 0
            for (v1, v2), y in loader:
                assert v1.shape == v2.shape == (batch, 3, 24, 24) and y.shape == (batch,)
                assert not torch.equal(v1, v2)  # independent augmentations
                n += 1
            assert n == len(loader)
        assert lens == {keys_total // (world * batch)}
    # single view (cross-entropy scoring): images through the training transform
    (x, y) = next(iter(make_score_loader(_cfg(shards), 0, 1, 4, two_view=False)))
    assert x.shape == (4, 3, 16, 16)


def test_score_stream_reads_each_sample_at_most_once(shards):
    from gps_ds.data.corrupt import CorruptCounter
    from gps_ds.data.exact_stream import ExactStream
    from gps_ds.data.samples import SampleProcessor

    keys = _all_keys(shards)

    class KeyIndex(SampleProcessor):  # "decodes" a sample to the index of its key
        def decode(self, sample):
            return keys.index(sample["__key__"]), int(sample["cls"])

        def apply(self, index, label):
            return torch.tensor(index), label

    seen = []
    for rank in range(3):
        stream = ExactStream(resolve(shards).urls, SIZES, rank=rank, world_size=3, batch_size=3, drop_last=True,
                             processor=KeyIndex(None), counter=CorruptCounter())
        batches = list(stream)
        assert len(batches) == 3
        seen += [i for x, _ in batches for i in x.tolist()]
    assert len(seen) == 27 == len(set(seen))  # 32 // 9 * 9 samples, none twice


def test_few_shot_reader_filter(written):
    k = 2
    cfg = _cfg(written, few_shot=k, seed=4, test_split="train")
    labels = [pair for shard in scan_labels(resolve(written, "train").urls) for pair in shard]
    chosen = select_few_shot(labels, k, seed=4)
    assert len(chosen) == k * CLASSES
    assert Counter(dict(labels)[c] for c in chosen) == Counter({c: k for c in range(CLASSES)})
    assert len(make_train_loader(cfg, 0, 1, 4)) == math.ceil(k * CLASSES / 4)
    ys = torch.cat([y for _, y in make_train_loader(cfg, 0, 1, 4)])
    assert len(ys) == 8 and set(ys.tolist()) <= set(range(CLASSES))
    # the exact (scoring / eval-on-train) stream reads exactly the chosen keys
    got, _ = _eval_keys(make_eval_loader(cfg, 0, 1, 4, split="train"))
    assert sorted(got) == chosen
    assert select_few_shot(labels, k, seed=5) != chosen
    assert select_few_shot(list(reversed(labels)), k, seed=4) == chosen  # order does not matter


def test_url_forms_and_info_folder(shards, written, tmp_path):
    urls = resolve(shards).urls
    assert resolve(shards).counts == [None] * 5  # no _info.json: counted when needed
    assert resolve(shards).with_counts().counts == SIZES
    forms = [shards, urls, [f"pipe:cat {u}" for u in urls], f"{urls[0]}::{shards.replace('000000..000004', '000001..000004')}"]
    for spec in forms:
        got, _ = _eval_keys(make_eval_loader(_cfg(spec), 0, 2, 4))
        got1, _ = _eval_keys(make_eval_loader(_cfg(spec), 1, 2, 4))
        assert sorted(got + got1) == sorted(_all_keys(shards)), spec
    folder = resolve(written, "train")
    assert folder.size == 15 and len(folder.urls) == 4 and folder.info["num_classes"] == CLASSES
    # a pattern inside a writer's folder finds the counts in its _info.json
    assert resolve(written + "/train-{000000..000003}.tar").counts == [4, 4, 4, 3]
    assert resolve_num_classes(_cfg(written)) == CLASSES
    with pytest.raises(KeyError, match="no split 'test'"):
        make_eval_loader(_cfg(written), 0, 1, 4)
    with pytest.raises(FileNotFoundError):
        resolve(str(tmp_path / "missing-{0..1}.tar"))
    with pytest.raises(ValueError, match="data.val is not set"):
        make_eval_loader(_cfg(written), 0, 1, 4, split="val")


def test_http_urls(shards):
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    folder = resolve(shards).urls[0].rsplit("/", 1)[0]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000000..000004}}.tar"
        got, _ = _eval_keys(make_eval_loader(_cfg(spec), 0, 1, 8))
        assert sorted(got) == sorted(_all_keys(shards))
        assert len(list(make_train_loader(_cfg(spec, steps_per_epoch=3), 0, 1, 4))) == 3
    finally:
        server.shutdown()


def test_mixup_cutmix_soft_targets(written):
    from gps_ds.data import build_train_criterion

    cfg = _cfg(written, mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1})
    x, y = next(iter(make_train_loader(cfg, 0, 1, 4)))
    assert y.shape == (4, CLASSES) and y.dtype == torch.float32
    assert torch.allclose(y.sum(1), torch.ones(4))
    assert y.min() >= 0.1 / CLASSES - 1e-6  # label smoothing spreads mass
    assert type(build_train_criterion(cfg)).__name__ == "SoftTargetCrossEntropy"
    with pytest.raises(ValueError, match="even batch"):
        make_train_loader(cfg, 0, 1, 3)
    smooth = _cfg(written, mixup={"label_smoothing": 0.1})
    _, y = next(iter(make_train_loader(smooth, 0, 1, 3)))
    assert y.dtype == torch.int64  # smoothing alone: integer labels, the criterion smooths
    assert type(build_train_criterion(smooth)).__name__ == "LabelSmoothingCrossEntropy"
    assert type(build_train_criterion(_cfg(written))).__name__ == "CrossEntropyLoss"


def test_grayscale_digits_become_three_channels(tmp_path):
    datasets.write_digits(tmp_path / "d", progress=False)
    cfg = DataConfig(train=str(tmp_path / "d"), test=str(tmp_path / "d"), recipe="digits", image_size=16, workers=0)
    batch = next(iter(make_eval_loader(cfg, 0, 1, 8)))
    assert batch.inputs.shape == (8, 3, 16, 16)
    x = batch.inputs * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    assert torch.allclose(x[:, 0], x[:, 1], atol=1e-5) and torch.allclose(x[:, 1], x[:, 2], atol=1e-5)
    assert resolve_num_classes(cfg) == 10


def test_segmentation_loaders(tmp_path):
    root = syn.make_kvasir(tmp_path / "k", n=6, size=(40, 30))
    datasets.write_kvasir(root, tmp_path / "s", test_size=2, progress=False)
    cfg = DataConfig(train=str(tmp_path / "s"), test=str(tmp_path / "s"), recipe="segmentation", image_size=32,
                     workers=0, hflip=0.5, vflip=0.5)
    x, m = next(iter(make_train_loader(cfg, 0, 1, 2)))
    assert x.shape == (2, 3, 32, 32) and m.shape == (2, 1, 32, 32)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    batches = list(make_eval_loader(cfg, 0, 1, 2))
    assert len(batches) == 1 and batches[0].valid.all() and batches[0].targets.masks.shape == (2, 1, 32, 32)
    (v, m), = [b for b in make_score_loader(cfg, 0, 1, 2)][:1]  # segmentation scores with the task loss
    assert v.shape == (2, 3, 32, 32) and m.shape == (2, 1, 32, 32)


def test_shard_walk_splits_by_rank_and_worker():
    from itertools import islice

    from gps_ds.data.train_stream import shard_sequence

    urls = [f"s{i}" for i in range(10)]
    readers = 4  # e.g. 2 ranks x 2 workers
    first = [list(islice(shard_sequence(urls, 0, 0, r, readers), 3)) for r in range(readers)]
    walk = [u for pos in range(12) for u in [first[pos % readers][pos // readers]]]
    assert sorted(walk[:10]) == urls  # one pass: every shard once, split among the readers
    assert len({u for seq in first for u in seq[:2]}) == 8  # disjoint while the pass lasts
    take = lambda seed, epoch: list(islice(shard_sequence(urls, seed, epoch, 0, readers), 5))  # noqa: E731
    assert take(0, 0) == take(0, 0) and take(0, 1) != take(0, 0) and take(1, 0) != take(0, 0)
    # fewer shards than readers: everyone still gets shards, taking turns
    few = [list(islice(shard_sequence(["a", "b"], 0, 0, r, 6), 4)) for r in range(6)]
    assert all(len(seq) == 4 for seq in few)
