"""Corrupt data: garbage tar, truncated tar, undecodable image, missing key — skipped,
warned about, counted; never a crash, never a hang."""

import os
import tarfile
import warnings

import numpy as np
import pytest

from gps_ds.data import CorruptDataWarning, DataConfig, NoDataError, datasets, make_eval_loader, make_train_loader
from gps_ds.data import synthetic as syn
from gps_ds.data.tario import write_tar

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::gps_ds.data.corrupt.CorruptDataWarning")]


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    """4 shards (4, 4, 4, 3 samples per _info.json): #1 garbage, #2 cut inside its 3rd
    sample, #3 rewritten as [undecodable, no label, good]. Returns (folder, good keys)."""
    root = tmp_path_factory.mktemp("corrupt")
    syn.make_imagefolder(root / "src", classes=3, per_class=5)
    info = datasets.write_imagefolder(root / "src", root / "out", shard_size=4, progress=False)
    out = root / "out"
    names = [s["name"] for s in info["splits"]["train"]["shards"]]
    with tarfile.open(out / names[0]) as tar:
        good = sorted({m.name.split(".")[0] for m in tar.getmembers()})
    (out / names[1]).write_bytes(os.urandom(6000))
    with tarfile.open(out / names[2]) as tar:
        members = tar.getmembers()
        good += sorted({m.name.split(".")[0] for m in members[:4]})
        cut = members[4].offset + 100
    data = (out / names[2]).read_bytes()
    (out / names[2]).write_bytes(data[:cut])
    jpg = syn.jpeg_bytes(syn.random_image(np.random.default_rng(0), 20, 20))
    write_tar(str(out / names[3]), [("x_bad", {"jpg": b"\xff\xd8\xffgarbage", "cls": b"1"}),
                                    ("x_nolabel", {"jpg": jpg}),
                                    ("x_good", {"jpg": jpg, "cls": b"2"})])
    return str(out), sorted(good + ["x_good"])


def _cfg(folder, workers, recipe="vtab"):
    return DataConfig(train=folder, test=folder, test_split="train", recipe=recipe, image_size=16,
                      workers=workers, shuffle_buffer=4)


@pytest.mark.parametrize("workers,recipe", [(0, "vtab"), (2, "vtab"), (0, "fgvc")])  # fgvc: lazy (draft) decoding
def test_train_skips_and_counts(corrupt, workers, recipe, monkeypatch):
    import gps_ds.data.corrupt as corrupt_mod

    monkeypatch.setattr(corrupt_mod, "_warned", 0)  # the per-process warning budget: earlier tests spend it
    folder, _ = corrupt
    loader = make_train_loader(_cfg(folder, workers, recipe), 0, 1, 3)
    assert len(loader) == 5  # ceil(15 / 3): sizes from _info.json
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    assert len(batches) == 5 and all(len(y) == 3 for _, y in batches)
    counts = loader.counter.counts()
    assert counts["bad_shard"] >= 1 and counts["decode"] >= 1 and counts["missing_key"] >= 1
    if workers == 0:  # warnings of worker processes go to their stderr
        assert any(issubclass(w.category, CorruptDataWarning) for w in caught)
    metrics = loader.counter.as_metrics()
    assert metrics["data/corrupt_total"] == sum(counts.values()) > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_keeps_batches_and_marks_bad_slots_invalid(corrupt, workers):
    folder, good = corrupt
    for world in (1, 2, 4):  # with 4 ranks, rank 1 owns exactly the garbage shard
        seen, lens, total = [], set(), {}
        for rank in range(world):
            loader = make_eval_loader(_cfg(folder, workers), rank, world, 4)
            lens.add(len(loader))
            batches = list(loader)
            assert len(batches) == len(loader)
            for b in batches:
                seen += [k for k, v in zip(b.keys, b.valid.tolist()) if v]
            for kind, n in loader.counter.counts().items():
                total[kind] = total.get(kind, 0) + n
        assert len(lens) == 1
        assert sorted(seen) == good  # every readable sample once; the broken ones never valid
        assert total["missing_sample"] == 6  # 4 in the garbage shard, 2 after the cut
        assert total["bad_shard"] >= 1 and total["decode"] == 1 and total["missing_key"] == 1


def test_without_info_json_counts_what_is_readable(corrupt, tmp_path):
    folder, good = corrupt
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    os.remove(plain / "_info.json")
    spec = str(plain / "train-{000000..000003}.tar")
    cfg = DataConfig(train=spec, test=spec, recipe="vtab", image_size=16, workers=0)
    loader = make_eval_loader(cfg, 0, 1, 4)
    keys = [k for b in loader for k, v in zip(b.keys, b.valid.tolist()) if v]
    assert sorted(keys) == good
    assert loader.counter.counts()["bad_shard"] == 2  # garbage and truncated, found while counting
    assert len(list(make_train_loader(cfg, 0, 1, 4))) == 3  # ceil(4+0+2+3 / 4)


def test_all_garbage_fails_clearly_instead_of_hanging(tmp_path):
    for i in range(2):
        (tmp_path / f"bad-{i}.tar").write_bytes(os.urandom(3000))
    spec = str(tmp_path / "bad-{0..1}.tar")
    cfg = DataConfig(train=spec, test=spec, recipe="vtab", image_size=16, workers=0, train_size=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NoDataError, match="without one readable sample"):
            list(make_train_loader(cfg, 0, 1, 2))
        with pytest.raises(NoDataError):
            make_eval_loader(cfg, 0, 1, 2)


def test_all_undecodable_fails_clearly(tmp_path):
    write_tar(str(tmp_path / "s.tar"), [(f"k{i}", {"jpg": b"nope", "cls": b"0"}) for i in range(5)])
    spec = str(tmp_path / "s.tar")
    cfg = DataConfig(train=spec, test=spec, recipe="vtab", image_size=16, workers=0, train_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NoDataError, match="no decodable sample"):
            list(make_eval_loader(cfg, 0, 1, 2))


def test_trainer_logs_the_counts(corrupt, tmp_path):
    """A training run over the corrupt shards finishes, and the skipped samples of its training and
    evaluation streams reach the summary and MLflow, split by kind."""
    from mlflow.tracking import MlflowClient

    from gps_ds.config import validate_config
    from gps_ds.engine import Trainer

    folder, good = corrupt
    cfg = validate_config({
        "model": {"name": "test_vit", "img_size": 16, "num_classes": 3},
        "data": {"train": folder, "test": folder, "test_split": "train", "recipe": "vtab", "image_size": 16,
                 "workers": 0, "shuffle_buffer": 4},
        "train": {"method": "linear", "epochs": 1, "lr": 0.01},
        "deepspeed": {"train_micro_batch_size_per_gpu": 3},
        "output": {"dir": str(tmp_path / "run")},
    })
    trainer = Trainer(cfg, show_progress=False)
    summary = trainer.run()
    counts = summary["data_corrupt"]
    seen = {k: trainer.train_loader.counter.counts()[k] + trainer.eval_loader.counter.counts()[k]
            for k in ("bad_shard", "decode", "missing_key")}
    assert all(v >= 1 for v in seen.values()), seen
    assert {k: counts[f"data_corrupt_{k}"] for k in seen} == seen
    assert counts["data_corrupt_total"] == sum(trainer.train_loader.counter.counts().values()) + \
        sum(trainer.eval_loader.counter.counts().values())
    assert summary["test"]["count"] == len(good)  # every readable sample evaluated once, the rest skipped
    history = MlflowClient(summary["tracking_uri"]).get_metric_history(summary["run_id"], "data_corrupt_total")
    assert history[-1].value == counts["data_corrupt_total"]
