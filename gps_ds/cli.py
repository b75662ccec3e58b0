"""`gps-ds` console script: one sub-command per job; user mistakes exit 2 with one line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

EXIT_USER_ERROR = 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="JSON config file (defaults apply when omitted)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set gps.k=2 (value parsed as JSON, else string)")


def _load(args):
    from gps_ds.config import load_config

    return load_config(args.config, args.overrides)


def cmd_count(args) -> int:
    from gps_ds.count import count_parameters
    from gps_ds.models import create_model
    from gps_ds.rules import classify

    model = create_model(args.model, args.num_classes, device="meta")
    result = {"model": args.model, "num_classes": args.num_classes, **count_parameters(model, classify(model), args.k)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.model}, K={args.k}, {args.num_classes} classes: backbone {result['backbone']:,} parameters")
    for method in ("gps", "full", "linear", "bitfit"):
        r = result[method]
        print(f"  {method:7s} trains {r['total']:>12,}  ({r['percent_of_backbone']:.3f}% of backbone)"
              + (f"  = {r['selected']:,} selected + {r['whole']:,} whole" if method == "gps" else ""))
    return 0


def cmd_select(args) -> int:
    from gps_ds.selection.pipeline import select_from_config

    cfg = _load(args)
    summary = select_from_config(cfg, out=args.out, scores_out=args.save_scores, show_progress=not args.quiet)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}: {summary['selected']:,} weights selected in {summary['tensors']} tensors "
              f"(K={summary['k']}, scheme {summary['scheme']}, loss {summary['loss']}, {summary['samples']} samples)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gps-ds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("count", help="count the parameters GPS trains, without data")
    p.add_argument("--model", required=True, help="timm model name, e.g. vit_base_patch16_224")
    p.add_argument("--k", type=int, default=1, help="connections kept per neuron")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_count)

    p = sub.add_parser("select", help="score the training data and write the mask file")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    p.add_argument("--save-scores", help="also write the fp32 scores (.safetensors)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_select)
    return parser


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a user mistake: printed as one line, never as a traceback."""
    return (ValueError, OSError)


def run(argv: Sequence[str] | None, parser_factory: Callable[[], argparse.ArgumentParser] = build_parser) -> int:
    args = parser_factory().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except user_error_types() as err:
        if os.environ.get("GPS_DS_DEBUG"):
            raise
        print(f"gps-ds {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("gps-ds: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
