"""`gps-ds analyze counts|blocks|overlap|tsne`: arguments and drivers (PNG + JSON in --out)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", default=default_out, help=f"output folder (default {default_out})")
    p.add_argument("--mlflow-run", help="also log the PNG and JSON as artifacts of this MLflow run id")
    p.add_argument("--tracking-uri", help="MLflow tracking URI of --mlflow-run (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _labelled(items: list[str]) -> dict[str, str]:
    """`LABEL=FILE` or `FILE` (label: the file stem) -> {label: file}."""
    out: dict[str, str] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep:
            label, path = Path(item).stem, item
        if label in out:
            raise ValueError(f"label '{label}' is used twice (name them LABEL=FILE)")
        out[label] = path
    return out


def _finish(args, name: str, result: dict, fig, text: str, extra: list | None = None) -> int:
    from gps_ds.analysis.common import log_to_mlflow, write_outputs

    paths = write_outputs(args.out, name, result, fig) + list(extra or [])
    log_to_mlflow(args.mlflow_run, args.tracking_uri, paths)
    if args.json:
        print(json.dumps(result))
    else:
        print(text)
        print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def cmd_counts(args) -> int:
    from gps_ds.analysis.counts import DEFAULT_MODELS, analyze_counts, format_table

    models = [m.strip() for m in args.models.split(",")] if args.models else list(DEFAULT_MODELS.values())
    result, fig = analyze_counts(models, args.k, args.num_classes, paper_check=not args.no_paper_check)
    return _finish(args, "counts", result, fig, format_table(result))


def cmd_blocks(args) -> int:
    from gps_ds.analysis.blocks import compare_blocks, plot_blocks, single_plots
    from gps_ds.analysis.common import read_selection

    files = _labelled(args.selections)
    if len(files) != 2:
        raise ValueError(f"blocks compares two selections, got {len(files)}")
    sels = {label: read_selection(path)[0] for label, path in files.items()}
    result = compare_blocks(sels)
    result["files"] = files
    fig = plot_blocks(result, title=" vs ".join(files) + ": selected entries per block")
    lines = ["| block | " + " | ".join(f"{l} (%)" for l in result["labels"]) + " |",
             "|---|" + "---|" * len(result["labels"])]
    for r in result["blocks"]:
        lines.append(f"| {r['block']} | " + " | ".join(f"{r[l]:,} ({r[l + '_percent']:.1f})" for l in result["labels"])
                     + " |")
    return _finish(args, "blocks", result, fig, "\n".join(lines), single_plots(sels, args.out))


def cmd_overlap(args) -> int:
    from gps_ds.analysis.common import read_selection
    from gps_ds.analysis.overlap import compute_overlap, plot_overlap

    files = _labelled(args.selections)
    sels = {label: read_selection(path)[0] for label, path in files.items()}
    result = compute_overlap(sels)
    result["files"] = files
    text = [f"union {result['union']:,} entries, shared by all {result['shared_by_all']:,} "
            f"(Jaccard {result['jaccard_all']:.3f})"]
    text += [f"  {label}: {n:,} selected" for label, n in result["per_task"].items()]
    text += [f"  only/shared {k}: {v:,}" for k, v in result["regions"].items()]
    return _finish(args, "overlap", result, plot_overlap(result), "\n".join(text))


def cmd_tsne(args) -> int:
    from gps_ds.analysis.tsne import analyze_tsne
    from gps_ds.config import load_config

    cfg = load_config(args.config, args.overrides)
    result, fig = analyze_tsne(cfg, args.delta, split=args.split, max_samples=args.max_samples, seed=args.seed,
                               perplexity=args.perplexity)
    text = (f"t-SNE of {result['samples']} {args.split} samples ({result['feature_dim']}-d penultimate features): "
            f"silhouette before {result['before']['silhouette']:.3f}, after {result['after']['silhouette']:.3f}; "
            f"5-NN accuracy before {result['before']['knn_accuracy']:.3f}, after {result['after']['knn_accuracy']:.3f}")
    return _finish(args, "tsne", result, fig, text)


def add_analyze_subcommands(sub: argparse._SubParsersAction) -> None:
    from gps_ds.analysis.counts import DEFAULT_KS

    p = sub.add_parser("counts", help="trainable parameters vs K per architecture, from shapes (Fig. 8, Table 7)")
    p.add_argument("--models", help="comma-separated model names (default: ViT-B/16, Swin-B, ConvNeXt-B, SAM ViT-B)")
    p.add_argument("--k", type=_ints, default=list(DEFAULT_KS), help="comma-separated K values")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--no-paper-check", action="store_true", help="skip the Table 7 comparison")
    _common(p, "runs/analysis/counts")
    p.set_defaults(func=cmd_counts)

    p = sub.add_parser("blocks", help="per-block distribution of two selections (Fig. 9), mask or delta files")
    p.add_argument("selections", nargs="+", metavar="[LABEL=]FILE")
    _common(p, "runs/analysis/blocks")
    p.set_defaults(func=cmd_blocks)

    p = sub.add_parser("overlap", help="overlap of the selections of N tasks (Fig. 12), mask or delta files")
    p.add_argument("selections", nargs="+", metavar="[LABEL=]FILE")
    _common(p, "runs/analysis/overlap")
    p.set_defaults(func=cmd_overlap)

    p = sub.add_parser("tsne", help="t-SNE of penultimate features before / after fine-tuning (Fig. 13)")
    p.add_argument("--config", required=True, help="the run's config (model, data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--delta", required=True, help="the fine-tuned delta file")
    p.add_argument("--split", default="test", choices=["test", "val", "train"])
    p.add_argument("--max-samples", type=int, default=1000)
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    _common(p, "runs/analysis/tsne")
    p.set_defaults(func=cmd_tsne)
