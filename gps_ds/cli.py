"""`gps-ds` console script: one sub-command per job; user mistakes exit 2 with one line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_OUT_OF_MEMORY = 3
# Commands that import DeepSpeed run with stdout sent to stderr (DeepSpeed prints banners and
# logs there); their result is written with emit() to the real stdout, so --json stays one object.
_RESULT_STREAM = sys.stdout


def emit(text: str) -> None:
    print(text, file=_RESULT_STREAM, flush=True)


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
    from gps_ds.selection.pipeline import select_from_config, select_from_config_zero

    cfg = _load(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under a launcher: per-shard scoring on every rank
        summary = select_from_config_zero(cfg, args.out, args.save_scores, show_progress=not args.quiet)
        if summary is None:  # not rank 0
            return 0
    else:
        summary = select_from_config(cfg, out=args.out, scores_out=args.save_scores, show_progress=not args.quiet)
    if args.json:
        emit(json.dumps(summary))
    else:
        emit(f"wrote {args.out}: {summary['selected']:,} weights selected in {summary['tensors']} tensors "
              f"(K={summary['k']}, scheme {summary['scheme']}, loss {summary['loss']}, {summary['samples']} samples)")
    return 0


def cmd_train(args) -> int:
    from gps_ds.engine import train

    cfg = _load(args)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite, show_progress=not args.quiet)
    from gps_ds import distributed as D

    if D.rank() == 0:
        emit(json.dumps(summary) if args.json else _train_summary_text(summary))
    return 0


def _train_summary_text(s: dict) -> str:
    t = s["trainable"]
    metric = s["metric"]
    test = f"test {metric} {s['test'][metric]:.4g}" if s.get("test") else "no test split"
    chosen = (f"best epoch {s['best_epoch']} on validation ({metric} {s['val'][metric]:.4g})" if s.get("val")
              else "last epoch (no validation split)")
    return (f"{s['method']}: {test}, {chosen}, {t['total']:,} trained parameters, {s['seconds']:.1f} s\n"
            f"delta: {s['delta']}  (MLflow: mlflow ui --backend-store-uri {s['tracking_uri']})")


def cmd_eval(args) -> int:
    from gps_ds.evaluation import evaluate_delta

    cfg = _load(args)
    if args.suite:  # ImageNet-A/-R/-C shard folders instead of the config's test data
        from gps_ds.robustness.cli import format_suite, run_suite

        result = run_suite(args, cfg)
        emit(json.dumps(result) if args.json else format_suite(result))
        return 0
    result = evaluate_delta(cfg, args.delta, split=args.split)
    metrics = ", ".join(f"{k} {result[k]:.4g}" for k in ("top1", "mdice", "miou") if k in result)
    emit(json.dumps(result) if args.json else
         f"{args.delta}: {metrics} on {result['count']} {args.split} samples, loss {result['loss']:.4f}")
    return 0


def cmd_delta_inspect(args) -> int:
    from gps_ds.delta import describe, load_delta

    info = describe(load_delta(args.delta))
    if args.json:
        print(json.dumps(info))
        return 0
    meta = info["meta"]
    backbone = int(meta.get("backbone_params", 0) or 0)
    pct = f" ({100.0 * info['total'] / backbone:.3f}% of the backbone's {backbone:,})" if backbone else ""
    print(f"{args.delta}: model {meta.get('model', '?')}, method {meta.get('method', '?')}, K={meta.get('k', '?')}")
    print(f"  trained: {info['total']:,}{pct} = {info['selected']:,} selected in {info['tensors_selected']} tensors"
          f" + {info['whole']:,} in {info['tensors_whole']} whole tensors")
    for block, n in info["per_block"].items():
        print(f"  {block:32s} {n:>10,}")
    return 0


def cmd_delta_merge(args) -> int:
    from gps_ds.delta import load_delta
    from gps_ds.methods import get_method
    from gps_ds.weights import load_state_dict, save_state_dict

    delta = load_delta(args.delta)
    head = json.loads(delta.meta.get("head", "[]"))
    # The delta's own method merges it (gps/full/...: entries and whole tensors; lora: W + (alpha/r) B A;
    # ssf: scale and shift folded into the layers; adapter/vpt refuse in one line).
    method = get_method(delta.meta.get("method", "gps"), json.loads(delta.meta.get("method_options", "{}")))
    from gps_ds.methods.base import Method

    if str(args.base).endswith(".safetensors") and type(method).merge is Method.merge:
        from gps_ds.weights import merge_streaming

        # Entries and whole tensors only: one base tensor in memory at a time (any model size).
        merged = range(merge_streaming(args.base, delta, head, args.out))
    else:
        merged = method.merge(load_state_dict(args.base), delta, head)
        save_state_dict(merged, args.out)
    print(f"wrote {args.out}: {len(merged)} tensors, {delta.num_selected():,} selected entries and "
          f"{len(delta.whole)} whole tensors from {args.delta}")
    return 0


def cmd_demo(args) -> int:
    from gps_ds.demo import run_demo

    rows = run_demo(args.out, pretrain_epochs=args.pretrain_epochs, epochs=args.epochs)
    if not args.no_segmentation:
        from gps_ds.demo_segmentation import run_segmentation_stage

        run_segmentation_stage(args.out)
    failed = [r["method"] for r in rows if "error" in r]
    if failed:
        print(f"gps-ds demo: {', '.join(failed)} failed (see the table)", file=sys.stderr)
        return 1
    return 0


def cmd_ablate(args) -> int:
    from gps_ds.ablate import DEFAULT_LOSSES, DEFAULT_SCHEMES, format_table, known_losses, parse_list, run_ablation
    from gps_ds.selection.schemes import SCHEMES

    schemes = parse_list(args.schemes, tuple(SCHEMES), "--schemes") if args.schemes else list(DEFAULT_SCHEMES)
    losses = parse_list(args.losses, known_losses(), "--losses") if args.losses else list(DEFAULT_LOSSES)
    cfg = _load(args)
    out = args.out or f"{cfg.output.dir}-ablation"
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_ablation(cfg, out, schemes, losses, resume=not args.no_resume, show_progress=not args.quiet,
                          log=log)
    emit(json.dumps(result) if args.json else f"{format_table(result)}\n\nwrote {out}/ablation.json, {out}/ablation.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gps-ds", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="show DeepSpeed's start-up logs and op builds "
                                                                "(also GPS_DS_VERBOSE=1); accepted after the command too")
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
    p.set_defaults(func=cmd_select, noisy=True)

    p = sub.add_parser("train", help="select (for gps) and train; writes delta files and MLflow runs")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir")
    p.add_argument("--overwrite", action="store_true", help="replace the run in output.dir")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train, noisy=True)

    p = sub.add_parser("ablate", help="one GPS model per selection scheme and scoring loss, same budget; one table")
    _add_config_args(p)
    p.add_argument("--schemes", help="comma-separated gps.scheme values (default: all: gps,net,layer,random-net,"
                                     "random-neuron,magnitude)")
    p.add_argument("--losses", help="comma-separated gps.loss values for the gradient schemes (default: supcon,ce)")
    p.add_argument("--out", help="folder for the runs, ablation.json and ablation.md (default: <output.dir>-ablation)")
    p.add_argument("--no-resume", action="store_true", help="train every run again, even finished ones")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_ablate, noisy=True)

    p = sub.add_parser("eval", help="evaluate a delta file on the config's test data")
    _add_config_args(p)
    p.add_argument("--delta", required=True)
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--json", action="store_true")
    from gps_ds.robustness.cli import add_robustness_shards, add_suite_arguments

    add_suite_arguments(p)
    p.set_defaults(func=cmd_eval, noisy=True)

    p = sub.add_parser("delta", help="inspect or merge delta files")
    dsub = p.add_subparsers(dest="delta_command", required=True)
    q = dsub.add_parser("inspect", help="counts, share of the backbone, per-block distribution")
    q.add_argument("delta")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_delta_inspect)
    q = dsub.add_parser("merge", help="write a dense checkpoint: base weights with the delta applied")
    q.add_argument("--delta", required=True)
    q.add_argument("--base", required=True, help="base checkpoint (.safetensors, or .pth read with weights_only)")
    q.add_argument("--out", required=True, help="dense checkpoint to write (.safetensors)")
    q.set_defaults(func=cmd_delta_merge)

    from gps_ds.data.cli import add_bench_data_arguments, add_shards_subcommands

    p = sub.add_parser("shards", help="write webdataset shards (ImageNet, VTAB-1k, FGVC, Kvasir-SEG, MNIST, digits)")
    shards_sub = p.add_subparsers(dest="kind", required=True)
    add_shards_subcommands(shards_sub)
    add_robustness_shards(shards_sub)  # imagenet-a, imagenet-r, imagenet-c

    p = sub.add_parser("bench", help="benchmarks (results go to docs/BENCHMARKS.md)")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    add_bench_data_arguments(bsub.add_parser("data", help="data-loader throughput next to the decode-only limit"))
    from gps_ds.bench.cli import add_bench_select_arguments, add_bench_train_arguments, add_bench_zero_arguments

    add_bench_train_arguments(bsub.add_parser("train", help="step time, peak memory, trainable state per method"))
    add_bench_select_arguments(bsub.add_parser("select", help="top-K and scoring-pass cost vs full fine-tuning"))
    add_bench_zero_arguments(bsub.add_parser("zero", help="per-rank memory of sparse training under ZeRO-3"))
    from gps_ds.bench.cli import add_bench_kernels_arguments, add_bench_trainer_arguments

    add_bench_kernels_arguments(bsub.add_parser("kernels", help="selected-entry gradient paths (dense, gather, "
                                                                 "triton, ...) per layer shape, dtype and K"))

    add_bench_trainer_arguments(bsub.add_parser("trainer", help="images/s of gps-ds train itself per method "
                                                                 "(DeepSpeed engine, shards on disk)"))

    from gps_ds.demo import FINETUNE_EPOCHS, PRETRAIN_EPOCHS

    p = sub.add_parser("demo", help="offline demo: pre-train on MNIST, fine-tune on few-label 8x8 digits with "
                                    "every method (lr chosen on validation), one table")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--pretrain-epochs", type=int, default=PRETRAIN_EPOCHS)
    p.add_argument("--epochs", type=int, default=FINETUNE_EPOCHS, help="fine-tuning epochs per run")
    p.add_argument("--no-segmentation", action="store_true", help="skip stage 3 (small SAM on digits-seg)")
    p.set_defaults(func=cmd_demo)

    from gps_ds.analysis.cli import add_analyze_subcommands
    from gps_ds.multitask import add_serve_arguments

    p = sub.add_parser("analyze", help="what GPS selects: counts vs K, per-block distribution, task overlap, t-SNE")
    add_analyze_subcommands(p.add_subparsers(dest="analysis", required=True))
    add_serve_arguments(sub.add_parser("serve-tasks", help="several task deltas on one backbone: switch tasks in "
                                                          "place and classify image files"))
    from gps_ds.fewshot_curves import add_fewshot_arguments

    add_fewshot_arguments(sub.add_parser("fewshot", help="accuracy vs k samples per class over seeds, per method "
                                                         "(Fig. 10), resumable"))
    return parser


def out_of_memory_line(err: BaseException) -> str | None:
    """One line for an allocation that failed (host or accelerator memory); None for other errors."""
    import torch

    text = str(err).strip()
    oom = isinstance(err, (MemoryError, torch.OutOfMemoryError)) or any(
        s in text for s in ("can't allocate memory", "out of memory", "std::bad_alloc", "Cannot allocate memory"))
    if not oom:
        return None
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    first = text.splitlines()[0] if text else type(err).__name__
    first = first.split("DefaultCPUAllocator: ")[-1][:400]
    return (f"out of memory on rank {rank} of {world} ({first}): under ZeRO-3 each of N ranks holds 1/N of the "
            f"parameters (docs/distributed.md, 'Which sizes fit'): run on more ranks, offload them to the host "
            f"(deepspeed.zero_optimization.offload_param), or lower deepspeed.train_micro_batch_size_per_gpu")


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a user mistake or a run that cannot go on (NaN loss): printed as one
    line, never as a traceback."""
    from gps_ds.evaluation import TrainingError

    return (ValueError, OSError, TrainingError)


def run(argv: Sequence[str] | None, parser_factory: Callable[[], argparse.ArgumentParser] = build_parser) -> int:
    global _RESULT_STREAM
    argv = list(sys.argv[1:] if argv is None else argv)
    from gps_ds.verbosity import configure

    # --verbose anywhere (before or after the sub-command, as launchers pass it): DeepSpeed's chatter
    configure(verbose="--verbose" in argv or None)
    args = parser_factory().parse_args([a for a in argv if a != "--verbose"])
    _RESULT_STREAM = sys.stdout
    from gps_ds.testing.device_guard import enable_from_env

    enable_from_env()  # GPS_DS_DEVICE_GUARD=1: CPU-only tests of device placement (docs/distributed.md)
    try:
        if getattr(args, "noisy", False):
            with contextlib.redirect_stdout(sys.stderr):
                from gps_ds.distributed import quiet_deepspeed_stdout

                quiet_deepspeed_stdout()
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except user_error_types() as err:
        if os.environ.get("GPS_DS_DEBUG"):
            raise
        print(f"gps-ds {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("gps-ds: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as err:
        line = out_of_memory_line(err)
        if line is None or os.environ.get("GPS_DS_DEBUG"):
            raise
        print(f"gps-ds {args.command}: error: {line}", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY


def _exit(code: int) -> None:
    """Leave a multi-rank job cleanly: after success every rank meets once more and the process
    group is torn down before the interpreter exits; after a failure (a peer may be gone) the
    process ends without running the process group's destructors, whose background threads
    otherwise abort the exit ('terminate called without an active exception')."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if code == 0:
            dist.barrier()
            dist.destroy_process_group()
        else:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    _exit(run(argv))


def launcher_main(command: str, argv: Sequence[str] | None = None) -> None:
    """Entry of `launchers/*.py` under `deepspeed`/`torchrun`: drops the launcher's --local_rank
    argument (LOCAL_RANK is in the environment too) and runs `gps-ds <command> ...`."""
    # `python launchers/select.py` puts launchers/ first on sys.path, where select.py shadows the
    # standard library's `select` module that subprocess needs: drop that folder before any import.
    here = os.path.dirname(os.path.abspath(sys.argv[0]))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != here]
    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = True
            continue
        kept.append(a)
    _exit(run([command, *kept]))


if __name__ == "__main__":
    main()
