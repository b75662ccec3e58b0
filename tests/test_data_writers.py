"""Shard writers: determinism, _info.json, atomic writes, every dataset layout, CLI."""

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gps_ds.data import datasets as ds
from gps_ds.data import synthetic as syn
from gps_ds.data.cli import main as data_cli
from gps_ds.data.shards import read_info
from gps_ds.data.writer import Item, WriteOptions, write_dataset


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _members(tar_path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(tar_path) as tar:
        return tar.getmembers()


def _samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return syn.make_imagefolder(tmp_path_factory.mktemp("src") / "folder", classes=3, per_class=[5, 3, 4])


def test_imagefolder_deterministic_across_workers(folder, tmp_path):
    a = ds.write_imagefolder(folder, tmp_path / "a", shard_size=5, workers=1, progress=False)
    b = ds.write_imagefolder(folder, tmp_path / "b", shard_size=5, workers=2, progress=False)
    assert a == b
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # shards and _info.json, byte for byte
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no temporary folder left behind

    info = read_info(tmp_path / "a")
    assert info["classes"] == ["class0", "class1", "class2"] and info["num_classes"] == 3
    train = info["splits"]["train"]
    assert train["size"] == 12
    assert [s["samples"] for s in train["shards"]] == [5, 5, 2]
    assert [s["name"] for s in train["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for shard in train["shards"]:
        path = tmp_path / "a" / shard["name"]
        assert shard["bytes"] == path.stat().st_size
        for m in _members(path):  # fixed metadata: nothing depends on the time or the user
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o444)

    labels = {}
    for shard in train["shards"]:
        for key, files in _samples(tmp_path / "a" / shard["name"]).items():
            assert set(files) == {"jpg", "cls"} and "." not in key
            labels[key] = int(files["cls"])
    # the label is the class folder, and JPEG sources are copied byte for byte
    for key, label in labels.items():
        stem = key.split("_", 1)[1]
        src = folder / f"class{label}" / f"{stem}.jpg"
        assert src.is_file()
    first = next(iter(_samples(tmp_path / "a" / "train-000000.tar").items()))
    assert first[1]["jpg"] == (folder / f"class{int(first[1]['cls'])}" / f"{first[0].split('_', 1)[1]}.jpg").read_bytes()
    # shuffled: consecutive samples are not sorted by class
    order = [int(f["cls"]) for s in train["shards"] for f in _samples(tmp_path / "a" / s["name"]).values()]
    assert order != sorted(order)


def test_write_tar_is_byte_deterministic_whatever_the_clock(tmp_path, monkeypatch):
    """Shards come from webdataset's TarWriter with a fixed mtime: the same samples written at two
    different times give the same bytes, and webdataset's reader gives the samples back in order."""
    import webdataset as wds
    import webdataset.writer

    from gps_ds.data.tario import write_tar

    samples = [(f"k{i}", {"jpg": bytes([i]) * (100 + i), "cls": str(i % 3).encode()}) for i in range(5)]
    samples.append(("empty", {"jpg": b"", "cls": b""}))
    paths = []
    for i, clock in enumerate((1.0e9, 2.0e9 + 0.5)):
        monkeypatch.setattr(webdataset.writer.time, "time", lambda c=clock: c)
        paths.append(tmp_path / f"s{i}.tar")
        assert write_tar(str(paths[-1]), samples) == len(samples)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert all(m.mtime == 0 and m.mode == 0o444 and m.uname == "" for m in _members(paths[0]))
    read = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
            for s in wds.WebDataset(str(paths[0]), shardshuffle=False)]
    assert read == [(k, dict(f)) for k, f in samples]
    with pytest.raises(ValueError, match="must not contain"):
        write_tar(str(tmp_path / "bad.tar"), [("a.b", {"jpg": b"x"})])


def test_seed_changes_order_only(folder, tmp_path):
    a = ds.write_imagefolder(folder, tmp_path / "a", shard_size=100, seed=0, progress=False)
    b = ds.write_imagefolder(folder, tmp_path / "b", shard_size=100, seed=1, progress=False)
    sa, sb = _samples(tmp_path / "a" / "train-000000.tar"), _samples(tmp_path / "b" / "train-000000.tar")
    assert sa == sb and list(sa) != list(sb)
    assert a["splits"]["train"]["size"] == b["splits"]["train"]["size"] == 12


def test_refuses_to_overwrite_and_stays_atomic(folder, tmp_path):
    out = tmp_path / "out"
    ds.write_imagefolder(folder, out, progress=False)
    before = _digest(out)
    with pytest.raises(FileExistsError, match="overwrite"):
        ds.write_imagefolder(folder, out, shard_size=2, progress=False)
    assert _digest(out) == before
    # a failure half-way (an unknown split list) leaves the old folder untouched and no temp folder
    with pytest.raises(FileNotFoundError):
        ds.write_split_lists(folder, out, {"train": "nope.txt"}, required=["train"], overwrite=True, progress=False)
    assert _digest(out) == before
    ds.write_imagefolder(folder, out, shard_size=2, overwrite=True, progress=False)
    assert len(read_info(out)["splits"]["train"]["shards"]) == 6
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_undecodable_source_is_skipped_and_recorded(tmp_path):
    root = syn.make_imagefolder(tmp_path / "src", classes=2, per_class=2)
    (root / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        info = ds.write_imagefolder(root, tmp_path / "out", progress=False)
    train = info["splits"]["train"]
    assert train["size"] == 4 and train["skipped"] == 1
    assert "broken" in train["skipped_keys"][0][0]


def test_non_jpeg_sources_are_reencoded(tmp_path):
    root = tmp_path / "src" / "a"
    root.mkdir(parents=True)
    Image.fromarray(np.full((10, 12), 200, np.uint8), mode="L").save(root / "gray.png")
    Image.fromarray(np.zeros((10, 12, 4), np.uint8), mode="RGBA").save(root / "rgba.png")
    ds.write_imagefolder(tmp_path / "src", tmp_path / "jpg", progress=False)
    ds.write_imagefolder(tmp_path / "src", tmp_path / "png", lossless=True, progress=False)
    for name, ext, fmt in (("jpg", "jpg", "JPEG"), ("png", "png", "PNG")):
        samples = _samples(tmp_path / name / "train-000000.tar")
        for files in samples.values():
            img = Image.open(io.BytesIO(files[ext]))
            assert img.format == fmt and img.mode in ("L", "RGB") and img.size == (12, 10)
    gray = next(f for k, f in _samples(tmp_path / "png" / "train-000000.tar").items() if "gray" in k)
    assert gray["png"] == (root / "gray.png").read_bytes()  # lossless PNG source copied


def test_imagenet_train_and_val_with_labels_file(tmp_path):
    train = syn.make_imagefolder(tmp_path / "train", classes=2, per_class=2)
    for c, name in enumerate(["n01440764", "n01443537"]):
        os.rename(train / f"class{c}", train / name)
    val = tmp_path / "val"
    val.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        syn.random_image(rng, 20, 20).save(val / f"ILSVRC2012_val_{i:08d}.JPEG")
    (tmp_path / "labels.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000000,n01443537 1 2 3 4\n"
        "ILSVRC2012_val_00000001,n01440764 1 2 3 4\nILSVRC2012_val_00000002,n01443537 5 6 7 8\n")
    (tmp_path / "labels.txt").write_text(
        "ILSVRC2012_val_00000000.JPEG 1\nILSVRC2012_val_00000001.JPEG 0\nILSVRC2012_val_00000002.JPEG n01443537\n")
    for labels in ("labels.csv", "labels.txt"):
        out = tmp_path / f"out-{labels}"
        info = ds.write_imagenet(train, out, val, tmp_path / labels, progress=False)
        assert info["classes"] == ["n01440764", "n01443537"]
        assert info["splits"]["train"]["size"] == 4 and info["splits"]["val"]["size"] == 3
        got = {k.split("_", 1)[1]: int(f["cls"]) for k, f in _samples(out / "val-000000.tar").items()}
        assert got == {"ILSVRC2012_val_00000000": 1, "ILSVRC2012_val_00000001": 0, "ILSVRC2012_val_00000002": 1}
    (tmp_path / "bad.txt").write_text("ILSVRC2012_val_00000000.JPEG n99999999\n")
    with pytest.raises(ValueError, match="unknown class"):
        ds.write_imagenet(train, tmp_path / "bad", val, tmp_path / "bad.txt", progress=False)


def _layout_with_lists(root: Path, n: int, classes: int, image_dir: Path) -> list[tuple[str, int]]:
    rng = np.random.default_rng(1)
    image_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(n):
        rel = f"sub{i % 2}/im.{i}.jpg"  # dots and folders in the path: keys must stay clean
        (image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        syn.random_image(rng, 16, 16).save(image_dir / rel)
        pairs.append((rel, i % classes))
    return pairs


def test_vtab_split_lists(tmp_path):
    root = tmp_path / "vtab" / "dtd"
    pairs = _layout_with_lists(root, 14, 3, root / "images")
    lines = [f"images/{rel} {label}" for rel, label in pairs]
    (root / "train800.txt").write_text("\n".join(lines[:6]) + "\n")
    (root / "val200.txt").write_text("\n".join(lines[6:8]) + "\n")
    (root / "train800val200.txt").write_text("\n".join(lines[:8]) + "\n")
    (root / "test.txt").write_text("\n".join(lines[8:]) + "\n")
    info = ds.write_vtab(root, tmp_path / "out", progress=False)
    assert info["kind"] == "vtab" and info["classes"] == ["0", "1", "2"]
    assert {k: v["size"] for k, v in info["splits"].items()} == {"train": 8, "val": 2, "train800": 6, "test": 6}
    samples = _samples(tmp_path / "out" / "test-000000.tar")
    by_index = {int(k.split("_")[0]): int(f["cls"]) for k, f in samples.items()}
    expect = sorted(lines[8:])
    assert by_index == {i: int(line.rsplit(" ", 1)[1]) for i, line in enumerate(expect)}


def test_fgvc_json_splits_remap_labels(tmp_path):
    root = tmp_path / "CUB_200_2011"
    pairs = _layout_with_lists(root, 9, 3, root / "images")
    to_json = lambda ps: json.dumps({rel: label + 1 for rel, label in ps})  # 1-based labels, as in CUB  # noqa: E731
    (root / "train.json").write_text(to_json(pairs[:4]))
    (root / "val.json").write_text(to_json(pairs[4:6]))
    (root / "test.json").write_text(to_json(pairs[6:]))
    info = ds.write_fgvc(root, tmp_path / "out", progress=False)
    assert info["classes"] == ["1", "2", "3"] and info["num_classes"] == 3
    assert {k: v["size"] for k, v in info["splits"].items()} == {"train": 4, "val": 2, "test": 3}
    labels = sorted(int(f["cls"]) for f in _samples(tmp_path / "out" / "train-000000.tar").values())
    assert labels == sorted(label for _, label in pairs[:4])  # 1..3 -> 0..2


def test_split_lists_generic_and_missing_required(tmp_path):
    root = tmp_path / "r"
    pairs = _layout_with_lists(root, 6, 2, root)
    (root / "a.txt").write_text("\n".join(f"{rel} {'cat' if lab else 'dog'}" for rel, lab in pairs[:4]))
    (root / "b.txt").write_text("\n".join(f"{rel} {'cat' if lab else 'dog'}" for rel, lab in pairs[4:]))
    info = ds.write_split_lists(root, tmp_path / "out", {"train": ["a.txt", "b.txt"], "test": "b.txt"}, progress=False)
    assert info["classes"] == ["cat", "dog"]
    assert info["splits"]["train"]["size"] == 6 and info["splits"]["test"]["size"] == 2
    with pytest.raises(FileNotFoundError, match="missing list"):
        ds.write_split_lists(root, tmp_path / "out2", {"train": "a.txt", "test": "c.txt"}, required=["test"])


def test_kvasir_seeded_split_masks_and_boxes(tmp_path):
    root = syn.make_kvasir(tmp_path / "kvasir", n=10)
    info = ds.write_kvasir(root, tmp_path / "a", test_size=3, val_size=0, progress=False)
    again = ds.write_kvasir(root, tmp_path / "b", test_size=3, workers=2, val_size=0, progress=False)
    assert info == again and _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert info["splits"]["train"]["size"] == 7 and info["splits"]["test"]["size"] == 3
    assert info["segmentation"] is True and info["classes"] == ["background", "polyp"]
    boxes = json.loads((root / "kavsir_bboxes.json").read_text())
    for split in ("train", "test"):
        for key, files in _samples(tmp_path / "a" / f"{split}-000000.tar").items():
            assert set(files) == {"jpg", "mask.png", "bbox.json"}
            mask = np.asarray(Image.open(io.BytesIO(files["mask.png"])))
            assert set(np.unique(mask)) <= {0, 255} and mask.max() == 255  # binarised, lossless
            sid = key.split("_", 1)[1]
            assert json.loads(files["bbox.json"]) == boxes[sid]
            assert files["jpg"] == (root / "images" / f"{sid}.jpg").read_bytes()
    other_seed = ds.write_kvasir(root, tmp_path / "c", test_size=3, seed=5, val_size=0, progress=False)
    test_a = {k.split("_", 1)[1] for k in _samples(tmp_path / "a" / "test-000000.tar")}
    test_c = {k.split("_", 1)[1] for k in _samples(tmp_path / "c" / "test-000000.tar")}
    assert other_seed["splits"]["test"]["size"] == 3 and test_a != test_c


def test_kvasir_id_lists(tmp_path):
    root = syn.make_kvasir(tmp_path / "kvasir", n=6, bbox=False)
    ids = sorted(p.stem for p in (root / "images").iterdir())
    (tmp_path / "test.txt").write_text(f"{ids[0]}.jpg\n{ids[4]}\n")
    info = ds.write_kvasir(root, tmp_path / "out", test_ids=tmp_path / "test.txt", val_size=0, progress=False)
    got = {k.split("_", 1)[1] for k in _samples(tmp_path / "out" / "test-000000.tar")}
    assert got == {ids[0], ids[4]} and info["splits"]["train"]["size"] == 4
    (tmp_path / "bad.txt").write_text("nope\n")
    with pytest.raises(ValueError, match="not found"):
        ds.write_kvasir(root, tmp_path / "bad", test_ids=tmp_path / "bad.txt", progress=False)


def test_digits_and_mnist_offline_sets(tmp_path):
    info = ds.write_digits(tmp_path / "digits", shard_size=500, progress=False)
    assert info["splits"]["train"]["size"] == 1437 and info["splits"]["test"]["size"] == 360
    assert [s["samples"] for s in info["splits"]["train"]["shards"]] == [500, 500, 437]
    files = next(iter(_samples(tmp_path / "digits" / "test-000000.tar").values()))
    img = Image.open(io.BytesIO(files["png"]))
    assert img.mode == "L" and img.size == (8, 8)
    info = ds.write_mnist(tmp_path / "mnist", test_size=1000, shard_size=2000, workers=2, progress=False)
    assert info["splits"]["train"]["size"] == 4000 and info["splits"]["test"]["size"] == 1000
    files = next(iter(_samples(tmp_path / "mnist" / "test-000000.tar").values()))
    assert Image.open(io.BytesIO(files["png"])).size == (28, 28)
    counts = np.bincount([int(f["cls"]) for f in _samples(tmp_path / "mnist" / "test-000000.tar").values()])
    assert counts.tolist() == [100] * 10  # stratified hold-out


def test_writer_few_shot_option(folder, tmp_path):
    info = ds.write_imagefolder(folder, tmp_path / "fs", few_shot=2, seed=3, progress=False)
    assert info["few_shot"] == 2 and info["splits"]["train"]["size"] == 6
    labels = [int(f["cls"]) for f in _samples(tmp_path / "fs" / "train-000000.tar").values()]
    assert sorted(labels) == [0, 0, 1, 1, 2, 2]
    again = ds.write_imagefolder(folder, tmp_path / "fs2", few_shot=2, seed=3, progress=False)
    assert _digest(tmp_path / "fs") == _digest(tmp_path / "fs2")


def test_write_dataset_rejects_bad_keys_and_empty_splits(tmp_path):
    with pytest.raises(ValueError, match="no samples"):
        write_dataset(tmp_path / "x", {"train": []}, kind="t", options=WriteOptions(progress=False))
    img = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match="duplicate"):
        write_dataset(tmp_path / "x", {"train": [Item("a", img, 0), Item("a", img, 1)]}, kind="t",
                      options=WriteOptions(progress=False))
    assert not (tmp_path / "x").exists()


def test_cli_shards(tmp_path, capsys, folder):
    out = tmp_path / "d"
    assert data_cli(["shards", "digits", str(out), "--quiet", "--shard-size", "800", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["splits"]["train"]["size"] == 1437 and info == read_info(out)
    assert data_cli(["shards", "digits", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert data_cli(["shards", "digits", str(out), "--quiet", "--overwrite", "--test-size", "100"]) == 0
    assert read_info(out)["splits"]["test"]["size"] == 100
    assert data_cli(["shards", "imagefolder", str(folder), str(tmp_path / "f"), "--quiet", "--workers", "2",
                     "--split", "val", "--few-shot", "1"]) == 0
    assert "val: 3 samples" in capsys.readouterr().out
    assert data_cli(["shards", "info", str(tmp_path / "f"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["val"]["size"] == 3
