"""Segmentation data: evaluation batches carry the original-resolution masks, Kvasir-SEG's
validation split, and the offline digits-seg set read back through the loaders."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from gps_ds.data import DataConfig, make_eval_loader, make_score_loader, make_train_loader
from gps_ds.data import datasets as ds
from gps_ds.data import synthetic as syn
from gps_ds.data.cli import main as cli_main
from gps_ds.data.exact_stream import EvalBatch
from gps_ds.data.samples import SegTargets

KVASIR_SIZES = [(40, 30), (23, 37), (50, 50), (31, 18), (45, 26)]  # (width, height)


def _members(folder, split):
    """{key: {ext: bytes}} of every shard of a split, read with tarfile (not the loaders)."""
    out = {}
    info = json.loads((folder / "_info.json").read_text())
    for shard in info["splits"][split]["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def kvasir_root(tmp_path_factory):
    return syn.make_kvasir(tmp_path_factory.mktemp("kv") / "Kvasir-SEG", n=20, sizes=KVASIR_SIZES)


# ----------------------------------------------------------------------------- Kvasir-SEG splits
def test_kvasir_validation_split_from_train(kvasir_root, tmp_path):
    info = ds.write_kvasir(kvasir_root, tmp_path / "a", test_size=4, progress=False)
    # 20 images: 4 test, 16 train; 10% of 16 = 1.6 -> 2 val, 14 train
    assert {s: v["size"] for s, v in info["splits"].items()} == {"train": 14, "val": 2, "test": 4}
    assert info["val_size"] == 2 and info["test_size"] == 4 and info["segmentation"] is True
    on_disk = json.loads((tmp_path / "a" / "_info.json").read_text())
    assert on_disk["splits"]["val"]["size"] == 2 and on_disk["val_size"] == 2
    ids = {s: {k.split("_", 1)[1] for k in _members(tmp_path / "a", s)} for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert ids["train"] | ids["val"] | ids["test"] == {p.stem for p in (kvasir_root / "images").iterdir()}

    again = ds.write_kvasir(kvasir_root, tmp_path / "b", test_size=4, workers=2, progress=False)
    assert again == info and _digest(tmp_path / "a") == _digest(tmp_path / "b")
    other = ds.write_kvasir(kvasir_root, tmp_path / "c", test_size=4, seed=3, progress=False)
    other_val = {k.split("_", 1)[1] for k in _members(tmp_path / "c", "val")}
    assert other["splits"]["val"]["size"] == 2 and other_val != ids["val"]

    none = ds.write_kvasir(kvasir_root, tmp_path / "d", test_size=4, val_size=0, progress=False)
    assert set(none["splits"]) == {"train", "test"} and none["splits"]["train"]["size"] == 16
    # the test split does not depend on the validation carve-out
    assert {k.split("_", 1)[1] for k in _members(tmp_path / "d", "test")} == ids["test"]


def test_kvasir_val_with_id_lists_and_cli(kvasir_root, tmp_path):
    ids = sorted(p.stem for p in (kvasir_root / "images").iterdir())
    (tmp_path / "test.txt").write_text("\n".join(ids[:5]))
    rc = cli_main(["shards", "kvasir", str(kvasir_root), str(tmp_path / "out"), "--test-ids",
                   str(tmp_path / "test.txt"), "--val-size", "3", "--quiet"])
    assert rc == 0
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert {s: v["size"] for s, v in info["splits"].items()} == {"train": 12, "val": 3, "test": 5}
    val = {k.split("_", 1)[1] for k in _members(tmp_path / "out", "val")}
    assert val <= set(ids[5:])  # carved from train, never from the given test ids
    assert cli_main(["shards", "kvasir", str(kvasir_root), str(tmp_path / "seed7"), "--test-ids",
                     str(tmp_path / "test.txt"), "--val-size", "3", "--seed", "7", "--quiet"]) == 0
    assert {k.split("_", 1)[1] for k in _members(tmp_path / "seed7", "val")} != val  # the carve-out is seeded
    assert {k.split("_", 1)[1] for k in _members(tmp_path / "seed7", "test")} == set(ids[:5])
    assert cli_main(["shards", "kvasir", str(kvasir_root), str(tmp_path / "bad"), "--val-size", "16",
                     "--test-size", "4", "--quiet"]) == 2  # 16 of 16 training images: none left
    with pytest.raises(ValueError, match="val_size"):
        ds.write_kvasir(kvasir_root, tmp_path / "bad2", test_size=4, val_size=1.5, progress=False)


# ----------------------------------------------------------------------------- evaluation batches
@pytest.fixture(scope="module")
def kvasir_shards(kvasir_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("kvs") / "shards"
    ds.write_kvasir(kvasir_root, out, test_size=5, shard_size=2, progress=False)
    return out


@pytest.mark.parametrize("workers,device", [(0, None), (2, "cpu")])
def test_eval_batches_carry_original_masks(kvasir_shards, workers, device):
    cfg = DataConfig(train=str(kvasir_shards), test=str(kvasir_shards), val=str(kvasir_shards),
                     recipe="segmentation", image_size=32, workers=workers)
    stored = _members(kvasir_shards, "test")
    batches = list(make_eval_loader(cfg, 0, 1, 2, device=device))  # 5 samples: 3 batches, one padding slot
    assert len(batches) == 3
    seen = []
    for batch in batches:
        assert isinstance(batch, EvalBatch) and isinstance(batch.targets, SegTargets)
        masks, originals = batch.targets
        assert batch.inputs.shape == (2, 3, 32, 32) and masks.shape == (2, 1, 32, 32)
        assert masks.dtype == torch.float32 and set(masks.unique().tolist()) <= {0.0, 1.0}
        assert len(originals) == 2 == len(batch.keys) == batch.valid.numel()
        for orig, key, ok, mask in zip(originals, batch.keys, batch.valid.tolist(), masks):
            assert orig.dtype == torch.bool and orig.ndim == 2
            if not ok:
                assert key == ""
                continue
            want = np.asarray(Image.open(io.BytesIO(stored[key]["mask.png"]))) > 127
            img = Image.open(io.BytesIO(stored[key]["jpg"]))
            assert tuple(orig.shape) == (img.height, img.width) and np.array_equal(orig.numpy(), want)
            # the padded mask is zero outside the resized image (bottom/right padding)
            scale = 32 / max(img.width, img.height)
            w, h = int(img.width * scale + 0.5), int(img.height * scale + 0.5)
            assert mask[0, h:].sum() == 0 and mask[0, :, w:].sum() == 0 and mask.sum() > 0
            seen.append(key)
    assert sorted(seen) == sorted(stored) and batches[-1].valid.tolist() == [True, False]

    val = list(make_eval_loader(cfg, 0, 1, 2, split="val"))  # data.val + val_split "val"
    assert sum(int(b.valid.sum()) for b in val) == 2 and isinstance(val[0].targets, SegTargets)


def test_training_and_scoring_batches_stay_images_and_masks(kvasir_shards):
    cfg = DataConfig(train=str(kvasir_shards), recipe="segmentation", image_size=32, workers=0)
    x, m = next(iter(make_train_loader(cfg, 0, 1, 3)))
    assert isinstance(m, torch.Tensor) and x.shape == (3, 3, 32, 32) and m.shape == (3, 1, 32, 32)
    x, m = next(iter(make_score_loader(cfg, 0, 1, 3)))
    assert isinstance(m, torch.Tensor) and m.shape == (3, 1, 32, 32)


# ----------------------------------------------------------------------------- digits-seg
@pytest.fixture(scope="module")
def digits_seg(tmp_path_factory):
    out = tmp_path_factory.mktemp("dseg") / "digits-seg"
    info = ds.write_digits_seg(out, size=40, seed=0, shard_size=16, progress=False)
    return out, info


def test_digits_seg_writes_deterministic_splits(digits_seg, tmp_path):
    out, info = digits_seg
    # 40 images: 20% = 8 test, 10% of the other 32 = 3.2 -> 3 val, 29 train
    assert {s: v["size"] for s, v in info["splits"].items()} == {"train": 29, "val": 3, "test": 8}
    assert info["segmentation"] is True and info["kind"] == "digits-seg"
    assert json.loads((out / "_info.json").read_text()) == info
    sizes = set()
    for split in ("train", "val", "test"):
        for key, files in _members(out, split).items():
            assert set(files) == {"png", "mask.png"}
            img, mask = Image.open(io.BytesIO(files["png"])), np.asarray(Image.open(io.BytesIO(files["mask.png"])))
            assert img.mode == "RGB" and mask.shape == (img.height, img.width)
            assert set(np.unique(mask)) <= {0, 255} and (mask.any() or key.endswith("_empty"))
            assert 48 <= img.width <= 96 and 48 <= img.height <= 96
            sizes.add(img.size)
    assert len(sizes) > 20 and any(w != h for w, h in sizes)
    rc = cli_main(["shards", "digits-seg", "--out", str(tmp_path / "again"), "--size", "40", "--shard-size", "16",
                   "--quiet"])
    assert rc == 0 and _digest(tmp_path / "again") == _digest(out)  # same bytes from the CLI
    ds.write_digits_seg(tmp_path / "seed1", size=40, seed=1, shard_size=16, progress=False)
    assert _digest(tmp_path / "seed1") != _digest(out)
    with_empty = ds.write_digits_seg(tmp_path / "empty", size=12, empty_fraction=0.5, progress=False)
    stored_empty = sum(not np.asarray(Image.open(io.BytesIO(f["mask.png"]))).any()
                       for s in ("train", "val", "test") for f in _members(tmp_path / "empty", s).values())
    assert stored_empty == sum(with_empty["empty_masks"].values()) > 0


def _contrast(images, masks):
    """Per image, |mean inside the mask - mean outside| of the (normalised) pixels, over
    the resized, unpadded image area (padding is exactly 0 in all channels)."""
    out = []
    for x, m in zip(images, masks):
        inside = m[0] > 0.5
        area = (x != 0).any(0)
        outside = area & ~inside
        if inside.any() and outside.any():
            out.append((x[:, inside].mean() - x[:, outside].mean()).abs().item())
    return out


def test_digits_seg_reads_back_aligned(digits_seg):
    out, _ = digits_seg
    cfg = DataConfig(train=str(out), test=str(out), val=str(out), recipe="segmentation", image_size=64,
                     workers=0, hflip=1.0, vflip=1.0, shuffle_buffer=8)
    x, m = next(iter(make_train_loader(cfg, 0, 1, 8)))  # both flips applied to image and mask alike
    assert x.shape == (8, 3, 64, 64) and m.shape == (8, 1, 64, 64)
    aligned = _contrast(x, m)
    shifted = _contrast(x, m.roll(shifts=(5, 5), dims=(2, 3)))  # a misaligned mask for comparison
    assert len(aligned) >= 6 and min(aligned) > 0.4 and np.mean(aligned) > 2 * np.mean(shifted)
    unflipped = _contrast(x, m.flip(-1))
    assert np.mean(aligned) > 2 * np.mean(unflipped)

    stored = _members(out, "test")
    for batch in make_eval_loader(cfg, 0, 1, 3):
        masks, originals = batch.targets
        assert min(_contrast(batch.inputs[batch.valid], masks[batch.valid])) > 0.4
        for key, orig, ok in zip(batch.keys, originals, batch.valid.tolist()):
            if ok:
                img = Image.open(io.BytesIO(stored[key]["png"]))
                assert tuple(orig.shape) == (img.height, img.width)
