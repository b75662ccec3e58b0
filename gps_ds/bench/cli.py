"""Arguments of `gps-ds bench train`, `bench select` and `bench zero` (mounted in gps_ds/cli.py)."""

from __future__ import annotations

import argparse
import json
import time


def _emit(text: str) -> None:
    print(text, flush=True)


def add_bench_train_arguments(parser: argparse.ArgumentParser) -> None:
    from gps_ds.bench.train import DEFAULT_METHODS, METHODS

    parser.add_argument("--model", required=True,
                        help="timm model name or sam_vit_b / sam_vit_l / sam_vit_h / sam_small (built without weights)")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--k", type=int, default=1, help="connections kept per neuron for gps-*")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="repetitions (fresh processes), order rotated per round")
    parser.add_argument("--separate", action="store_true",
                        help="time each method in its own process (default: all methods in one process, "
                             "taking turns step by step)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma list of: {','.join(METHODS)} (decoder: SAM only)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute the backbone's blocks in the backward pass (activation checkpointing)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--img-size", type=int,
                        help="model and input size (default: the model's own; input 224, SAM 1024)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--write", metavar="MD", help="rewrite this run's section of a results file, e.g. docs/BENCHMARKS.md")
    parser.add_argument("--amp", choices=["bf16", "fp16"], help="forward under autocast in this dtype (fp32 weights)")
    parser.set_defaults(func=run_bench_train)


def _methods_flag(methods: list[str]) -> str:
    from gps_ds.bench.train import DEFAULT_METHODS

    return "" if list(methods) == list(DEFAULT_METHODS) else f" --methods {','.join(methods)}"


def _shape_flags(r: dict) -> str:
    from gps_ds.bench.train import is_sam

    size = f" --img-size {r['input_size']}" if is_sam(r["model"]) or r["input_size"] != 224 else ""
    amp = f" --amp {r['amp']}" if r.get("amp") else ""
    return size + (" --grad-checkpointing" if r.get("grad_checkpointing") else "") + amp


def train_section(result: dict) -> tuple[str, str, str]:
    """(key, title, markdown body) of a `bench train` result's section in docs/BENCHMARKS.md."""
    from gps_ds.bench.report import machine_lines
    from gps_ds.bench.targets import train_targets
    from gps_ds.bench.train import format_table, is_sam

    r, device = result, result["machine"]["device"]
    stamp = r.get("finished") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    timing = ("timed in one process, methods taking turns step by step" if r.get("interleave", True)
              else "each method timed in its own process (--separate)")
    body = (f"`gps-ds bench train --model {r['model']} --batch {r['batch']} --k {r['k']} --steps {r['steps']} "
            f"--warmup {r['warmup']} --rounds {r['rounds']}{_shape_flags(r)}{_methods_flag(r['methods'])}{'' if r.get('interleave', True) else ' --separate'}` "
            f"({stamp}; {timing})\n\n"
            f"{machine_lines(r['machine'])}\n* memory: {r['memory_kind']}; trainable state = "
            f"trainable parameters + gradients + AdamW moments\n\n{format_table(r)}\n")
    targets = train_targets(r)
    if targets:
        body += f"\nTargets (issues #6, #11):\n\n{targets}\n"
    ckpt = r.get("grad_checkpointing")
    shape = f", {r['input_size']} px" if r["input_size"] != 224 else ""
    title = (f"Training step: {r['model']}{shape}, batch {r['batch']}, K={r['k']}"
             f"{', activation checkpointing' if ckpt else ''}{', autocast ' + r['amp'] if r.get('amp') else ''} ({device})")
    key = f"train:{r['model']}:b{r['batch']}:k{r['k']}:{device}"
    if is_sam(r["model"]):
        key += f":px{r['input_size']}"
    return key + (":ckpt" if ckpt else "") + (f":{r['amp']}" if r.get("amp") else ""), title, body


def run_bench_train(args: argparse.Namespace) -> int:
    from gps_ds.bench.report import write_section
    from gps_ds.bench.targets import train_targets
    from gps_ds.bench.train import bench_train, format_table

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    result = bench_train(args.model, args.batch, args.k, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                         methods=methods, threads=args.threads, device=args.device, num_classes=args.num_classes,
                         img_size=args.img_size, interleave=not args.separate,
                         grad_checkpointing=args.grad_checkpointing, amp=args.amp)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.write:
        write_section(args.write, *train_section(result))
    if args.json:
        _emit(json.dumps(result, sort_keys=True))
    else:
        m = result["machine"]
        _emit(f"{args.model}, batch {args.batch}, K={args.k}, {m['threads']} threads, "
              f"other load {m.get('other_load_cores')} cores")
        _emit(format_table(result))
        _emit(train_targets(result))
    return 0


def add_bench_select_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="batch of the scoring / full steps")
    parser.add_argument("--steps", type=int, default=3, help="scoring batches = full fine-tuning steps")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="top-K repeats")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--img-size", type=int)
    parser.add_argument("--no-scoring", action="store_true", help="time the top-K only")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--write", metavar="MD")
    parser.set_defaults(func=run_bench_select)


def select_section(result: dict) -> tuple[str, str, str]:
    from gps_ds.bench.report import machine_lines
    from gps_ds.bench.select import format_table
    from gps_ds.bench.targets import select_targets

    r = result
    sc = r.get("scoring") or {}
    stamp = r.get("finished") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = (f"`gps-ds bench select --model {r['model']} --k {r['k']} --batch {sc.get('batch')} "
            f"--steps {sc.get('steps')} --rounds {sc.get('rounds')}` ({stamp})\n\n{machine_lines(r['machine'])}\n"
            f"* wall clock, median over rounds\n\n{format_table(r)}\n")
    targets = select_targets(r)
    if targets:
        body += f"\nTargets (issue #6):\n\n{targets}\n"
    return f"select:{r['model']}:k{r['k']}", f"Selection: {r['model']}, K={r['k']}", body


def run_bench_select(args: argparse.Namespace) -> int:
    from gps_ds.bench.report import write_section
    from gps_ds.bench.select import bench_select, format_table

    result = bench_select(args.model, args.k, batch=args.batch, steps=args.steps, rounds=args.rounds,
                          repeats=args.repeats, threads=args.threads, num_classes=args.num_classes,
                          img_size=args.img_size, scoring=not args.no_scoring)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.write:
        write_section(args.write, *select_section(result))
    _emit(json.dumps(result, sort_keys=True) if args.json else format_table(result))
    return 0


def add_bench_zero_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name (built without weights)")
    parser.add_argument("--ranks", default="1,2,3", help="comma list of world sizes, one deepspeed launch each")
    parser.add_argument("--batch", type=int, default=4, help="batch per rank (fixed: the global batch grows with ranks)")
    parser.add_argument("--k", type=int, default=1, help="connections kept per neuron")
    parser.add_argument("--steps", type=int, default=3, help="training steps per launch")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--img-size", type=int, help="model and input size (default: the model's own, input 224)")
    parser.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per launch; the launch is killed after")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--write", metavar="MD", help="rewrite this run's section of a results file, e.g. docs/BENCHMARKS.md")
    parser.add_argument("--partitioned", action="store_true",
                        help="build inside deepspeed.zero.Init and load a (random) weights file rank by rank, as the "
                             "trainer does under ZeRO-3 (gps_ds/zero_init.py)")
    parser.set_defaults(func=run_bench_zero)


def run_bench_zero(args: argparse.Namespace) -> int:
    from gps_ds.bench.report import write_section
    from gps_ds.bench.zero import bench_zero, format_table, parse_ranks, section_body

    ranks = parse_ranks(args.ranks)
    result = bench_zero(args.model, ranks=ranks, batch=args.batch, k=args.k, steps=args.steps,
                        num_classes=args.num_classes, img_size=args.img_size, threads=args.threads,
                        timeout=args.timeout, partitioned=args.partitioned)
    table = format_table(result)
    if args.write:
        size = f" --img-size {args.img_size}" if args.img_size else ""
        command = (f"gps-ds bench zero --model {args.model} --ranks {','.join(map(str, ranks))} --batch {args.batch} "
                   f"--k {args.k} --steps {args.steps} --num-classes {args.num_classes}{size}"
                   + (" --partitioned" if args.partitioned else ""))
        body = section_body(result, command)
        write_section(args.write, f"zero:{args.model}:b{args.batch}:k{args.k}" + (":partitioned" if args.partitioned else ""),
                      f"ZeRO-3 sparse training memory per rank: {args.model}, batch {args.batch} per rank, K={args.k}"
                      + (", partitioned from construction" if args.partitioned else ""),
                      body)
    if args.json:
        _emit(json.dumps(result, sort_keys=True))
    else:
        _emit(f"{args.model}, batch {args.batch} per rank, K={args.k}, ZeRO-3 fp32 on CPU")
        _emit(table)
    return 0


def add_bench_trainer_arguments(parser: argparse.ArgumentParser) -> None:
    from gps_ds.bench.trainer import METHODS

    parser.add_argument("--models", default="vit_base_patch16_224,vit_small_patch16_224",
                        help="comma list of timm model names (built without weights)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of: {','.join(METHODS)}")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch (one process)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--log-every", type=int, default=2, help="train.log_every: steps per timed window")
    parser.add_argument("--rounds", type=int, default=1, help="repetitions, method order rotated")
    parser.add_argument("--k", type=int, default=1, help="connections kept per neuron (gps-sparse)")
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers")
    parser.add_argument("--images", type=int, default=128, help="generated training images")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the trainers (default: torch's)")
    parser.add_argument("--workdir", help="folder for shards and runs (default: a new temporary folder)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per gps-ds train run")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--write", metavar="MD", help="rewrite this run's section of a results file, e.g. docs/BENCHMARKS.md")
    parser.set_defaults(func=run_bench_trainer)


def run_bench_trainer(args: argparse.Namespace) -> int:
    import sys

    from gps_ds.bench.report import write_section
    from gps_ds.bench.trainer import bench_trainer, format_table, goal_line, section

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    result = bench_trainer(models, methods, batch=args.batch, steps=args.steps, log_every=args.log_every,
                           rounds=args.rounds, k=args.k, workers=args.workers, images=args.images,
                           img_size=args.img_size, workdir=args.workdir, timeout=args.timeout, threads=args.threads,
                           log=lambda s: print(s, file=sys.stderr, flush=True))
    result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.write:
        command = (f"gps-ds bench trainer --models {','.join(models)} --methods {','.join(methods)} --batch {args.batch} "
                   f"--steps {args.steps} --log-every {args.log_every} --rounds {args.rounds} --k {args.k} "
                   f"--workers {args.workers} --images {args.images} --img-size {args.img_size}")
        write_section(args.write, *section(result, command))
    if args.json:
        _emit(json.dumps(result, sort_keys=True))
    else:
        _emit(format_table(result))
        goal = goal_line(result)
        if goal:
            _emit(goal)
    return 0


def add_bench_kernels_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=64, help="images; positions = batch x --tokens")
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--ks", default="1,2,4,10,32", help="comma list of K")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16, float16")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--write", metavar="MD", help="rewrite this run's section of a results file")
    parser.set_defaults(func=run_bench_kernels)


def run_bench_kernels(args: argparse.Namespace) -> int:
    from gps_ds.bench.kernels import bench_kernels, format_table, section
    from gps_ds.bench.report import write_section

    try:
        ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--ks: expected a comma list of integers, got '{args.ks}'") from None
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    result = bench_kernels(args.device, batch=args.batch, tokens=args.tokens, ks=ks, dtypes=dtypes, reps=args.reps)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.write:
        command = (f"gps-ds bench kernels --device {args.device} --batch {args.batch} --tokens {args.tokens} "
                   f"--ks {args.ks} --dtypes {args.dtypes} --reps {args.reps}")
        write_section(args.write, *section(result, command))
    _emit(json.dumps(result, sort_keys=True) if args.json else format_table(result))
    return 0
