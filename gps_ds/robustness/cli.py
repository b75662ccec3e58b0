"""Command-line pieces: `gps-ds shards imagenet-a|imagenet-r|imagenet-c` and the options of
`gps-ds eval --suite imagenet-robustness`."""

from __future__ import annotations

import argparse
import sys


def add_robustness_shards(subparsers: argparse._SubParsersAction) -> None:
    from gps_ds.data.cli import _common, _options, _runner
    from gps_ds.robustness.metrics import CORRUPTIONS
    from gps_ds.robustness.writers import write_imagenet_c, write_subset

    for which, name in (("imagenet-a", "ImageNet-A"), ("imagenet-r", "ImageNet-R")):
        p = subparsers.add_parser(which, help=f"{name}: root/<wnid>/<image> (200 classes) -> split 'test', labels "
                                              f"as ImageNet-1k indices")
        p.add_argument("root")
        p.add_argument("out")
        p.add_argument("--wnids", help="the subset's 200 wnids, one a line (default: timm's copy of the official list)")
        p.add_argument("--classes", help="the 1000 ImageNet-1k wnids in class order (default: timm's list)")
        _common(p)
        p.set_defaults(func=_runner(lambda a, w=which: (write_subset(w, a.root, a.out, a.wnids, a.classes,
                                                                     **_options(a)), a.out)))

    p = subparsers.add_parser("imagenet-c", help="ImageNet-C: root/<corruption>/<severity>/<wnid>/<image> -> one "
                                                 "split per corruption-severity")
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--corruptions", help=f"comma-separated (default all 15: {','.join(CORRUPTIONS)})")
    p.add_argument("--severities", default="1,2,3,4,5")
    p.add_argument("--classes", help="the 1000 ImageNet-1k wnids in class order (default: timm's list)")
    _common(p)

    def _c(a):
        corruptions = [c for c in a.corruptions.split(",") if c] if a.corruptions else None
        try:
            severities = [int(s) for s in a.severities.split(",") if s]
        except ValueError:
            raise ValueError(f"--severities {a.severities!r}: expected integers 1-5") from None
        return write_imagenet_c(a.root, a.out, corruptions, severities, a.classes, **_options(a)), a.out

    p.set_defaults(func=_runner(_c))


def add_suite_arguments(p: argparse.ArgumentParser) -> None:
    from gps_ds.robustness.evaluate import SUITES

    g = p.add_argument_group("robustness suite")
    g.add_argument("--suite", choices=SUITES, help="evaluate on a suite of shard folders instead of the config's test data")
    g.add_argument("--imagenet-a", help="ImageNet-A shard folder (gps-ds shards imagenet-a)")
    g.add_argument("--imagenet-r", help="ImageNet-R shard folder (gps-ds shards imagenet-r)")
    g.add_argument("--imagenet-c", help="ImageNet-C shard folder (gps-ds shards imagenet-c)")


def run_suite(args, cfg) -> dict:
    from gps_ds.robustness.evaluate import evaluate_suite

    return evaluate_suite(cfg, args.delta, args.imagenet_a, args.imagenet_r, args.imagenet_c,
                          log=lambda m: print(m, file=sys.stderr, flush=True))


def format_suite(result: dict) -> str:
    parts = []
    for key, name in (("imagenet_a", "ImageNet-A"), ("imagenet_r", "ImageNet-R")):
        if key in result:
            parts.append(f"{name} top-1 {result[key]['top1']:.2f} ({result[key]['count']} images)")
    if "imagenet_c" in result:
        c = result["imagenet_c"]
        parts.append(f"ImageNet-C mCE {c['mce']:.2f}" + ("" if c["complete"] else
                     f" (partial: {c['corruptions']} corruptions / {len(c['splits'])} splits)"))
    return f"{result['delta']}: " + ", ".join(parts)


