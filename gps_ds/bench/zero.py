"""`gps-ds bench zero`: per-rank memory of sparse-mode GPS training under DeepSpeed ZeRO-3.

For every world size N in ``--ranks`` (default 1, 2, 3) one ``deepspeed --num_gpus N`` launch
starts N CPU ranks (gloo) of this module's worker; the launch runs in its own process group with
a deadline and the whole group is killed when it passes.  Every rank

1. imports everything, initialises the process group and records its RSS (the *baseline*);
2. builds the timm model without weights, converts it to sparse mode with a random selection of
   K entries per row (``prepare_model(..., "gps", selection, "sparse")``) and wraps it with
   ``deepspeed.initialize`` under ZeRO-3 (fp32, torch AdamW on the trainable parameters);
3. resets its peak-RSS counter (``/proc/self/clear_refs``) and runs ``--steps`` training steps
   (forward + backward + step) on random inputs of a fixed **per-rank** batch.

With ``--partitioned`` step 2 is what the trainer does under ZeRO-3 with a weights file
(``gps_ds/zero_init.py``): the model is built inside ``deepspeed.zero.Init``, each rank reads only
its slices of a weights file (random values, written once by the driver tensor by tensor) and
sparse mode is applied to the partitions. Without it every rank builds the whole model first.

Reported per rank: the *setup* peak (step 2), the *training* peak (step 3, the steady state, the
headline), both as absolute peak RSS and above the baseline, the parameter bytes held locally
(ZeRO-3 partitions ``ds_tensor`` + anything not partitioned) and the trainable-state bytes
(fp32 partitions of the trainable parameters, their gradients and AdamW moments, as held by the
ZeRO-3 optimizer).  Rank 0 gathers every rank's numbers (``all_gather_object``) and writes them.

The per-rank batch is fixed, so activation memory does not shrink with N; only parameter and
optimizer memory does.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

DEFAULT_RANKS = (1, 2, 3)
# ZeRO-3 settings: every parameter partitioned (persistence threshold 0), few parameters live at
# once and small buckets, so the partitioning, not a prefetch/bucket buffer, bounds memory.
ZERO3 = {
    "stage": 3,
    "stage3_param_persistence_threshold": 0,
    "stage3_max_live_parameters": 10_000_000,
    "stage3_max_reuse_distance": 0,
    "stage3_prefetch_bucket_size": 5_000_000,
    "reduce_bucket_size": 5_000_000,
    "allgather_bucket_size": 5_000_000,
    "contiguous_gradients": True,
    "overlap_comm": False,
}
MARK = "[gps-ds bench zero] "


class BenchError(ValueError):
    pass


# --------------------------------------------------------------------------- worker (one rank)

def _kib(field: str) -> int:
    from gps_ds.bench.common import proc_status_kib

    return proc_status_kib(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _bytes(t) -> int:
    return t.numel() * t.element_size() if t is not None else 0


def local_param_bytes(model) -> dict[str, int]:
    """Bytes of parameters this rank holds: the ZeRO-3 partition (`ds_tensor`) plus any data
    still present (a partitioned parameter's `data` is empty outside a forward/backward), and
    the full size for comparison."""
    local = full = present = 0
    partitioned = unpartitioned = 0
    for p in model.parameters():
        full += p.ds_numel * p.element_size() if hasattr(p, "ds_numel") else _bytes(p)
        if hasattr(p, "ds_tensor"):
            local += _bytes(p.ds_tensor)
            partitioned += 1
        else:
            unpartitioned += 1
        present += _bytes(p.data)
    buffers = sum(_bytes(b) for b in model.buffers())
    return {"local": local + present, "partitions": local, "unpartitioned_data": present, "full": full,
            "buffers": buffers, "partitioned_tensors": partitioned, "unpartitioned_tensors": unpartitioned}


def zero3_state_bytes(engine) -> dict[str, int]:
    """Trainable state held by the ZeRO-3 optimizer on this rank: its fp32 partitions of the
    trainable parameters (`fp32_partitioned_groups_flat`), the gradient partitions
    (`grad_partitions_flat_buffer`) and the AdamW moments (scalar `step` excluded)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    flats = list(getattr(opt, "fp32_partitioned_groups_flat", None) or [])
    if not flats:  # not a ZeRO-3 optimizer: whatever the wrapped optimizer holds
        flats = [p for g in inner.param_groups for p in g["params"]]
    pb = sum(_bytes(p) for p in flats)
    buf = getattr(opt, "grad_partitions_flat_buffer", None)
    gb = _bytes(buf) if buf is not None else sum(_bytes(p.grad) for p in flats)
    sb = sum(_bytes(v) for st in inner.state.values() for v in st.values() if hasattr(v, "numel") and v.dim() > 0)
    return {"params": pb, "grads": gb, "optimizer": sb, "total": pb + gb + sb}


def ds_config(batch: int) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
            "steps_per_print": 10**9, "wall_clock_breakdown": False, "gradient_clipping": 0.0,
            "zero_optimization": dict(ZERO3)}


def run_rank(spec: dict[str, Any]) -> dict[str, Any] | None:
    """One rank of one launch; returns the gathered per-rank list on rank 0 (None elsewhere)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import deepspeed
    import timm  # noqa: F401  (imported before the baseline)
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import gps_ds.sparse  # noqa: F401
    from gps_ds.distributed import init_distributed, quiet_deepspeed_stdout
    from gps_ds.methods import prepare_model
    from gps_ds.models import create_model
    from gps_ds.rules import classify
    from gps_ds.sparse.testing import random_selection

    quiet_deepspeed_stdout()
    t_start = time.perf_counter()
    rank, world = init_distributed()
    phases = {"init_distributed_s": time.perf_counter() - t_start}
    threads = int(spec.get("threads") or max(1, (os.cpu_count() or 1) // world))
    torch.set_num_threads(threads)
    num_classes, size, batch = int(spec["num_classes"]), int(spec["input_size"]), int(spec["batch"])
    gc.collect()
    baseline_kib = _kib("VmRSS")
    import_peak_kib = _kib("VmHWM")
    reset_ok = reset_peak_rss()

    # ---- setup: build, sparsify, partition
    t0 = time.perf_counter()
    torch.manual_seed(int(spec.get("seed", 0)))
    if spec.get("weights"):  # partitioned from construction: no rank ever holds the whole model
        from gps_ds.zero_init import build_partitioned_model

        model, shapes, _ = build_partitioned_model(spec["model"], num_classes, Path(spec["weights"]), ds_config(batch),
                                                   seed=int(spec.get("seed", 0)), img_size=spec.get("img_size"))
    else:
        model = shapes = create_model(spec["model"], num_classes, img_size=spec.get("img_size"))
    roles = classify(shapes)
    cands = set(roles.candidates)
    selection = {n: idx for n, idx in random_selection(shapes, int(spec["k"]), seed=int(spec.get("seed", 0))).items()
                 if n in cands}
    prepare_model(model, roles, "gps", selection, "sparse")
    selected = sum(int((idx >= 0).sum()) for idx in selection.values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in trainable)
    del selection
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=trainable,
                                           config=ds_config(batch))
    del trainable
    gc.collect()
    phases["setup_s"] = time.perf_counter() - t0
    setup_peak_kib = _kib("VmHWM")
    after_setup_kib = _kib("VmRSS")
    params_after_setup = local_param_bytes(engine.module)

    # ---- training: the steady state
    if reset_ok:
        reset_peak_rss()
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    step_s, losses = [], []
    for _ in range(int(spec["steps"])):
        t0 = time.perf_counter()
        loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        step_s.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    train_peak_kib = _kib("VmHWM")
    after_train_kib = _kib("VmRSS")
    params = local_param_bytes(engine.module)
    entry = {
        "rank": rank, "world": world, "threads": threads,
        "baseline_rss_bytes": baseline_kib * 1024, "import_peak_rss_bytes": import_peak_kib * 1024,
        "setup_peak_rss_bytes": setup_peak_kib * 1024, "rss_after_setup_bytes": after_setup_kib * 1024,
        "train_peak_rss_bytes": train_peak_kib * 1024, "rss_after_train_bytes": after_train_kib * 1024,
        "setup_peak_bytes": max(0, setup_peak_kib - baseline_kib) * 1024,
        "train_peak_bytes": max(0, train_peak_kib - baseline_kib) * 1024,
        "peak_reset": reset_ok,
        "param_bytes": params, "param_bytes_after_setup": params_after_setup,
        "state_bytes": zero3_state_bytes(engine),
        "trainable_params": trainable_numel, "selected": selected,
        "step_s": step_s, "losses": losses, "phases_s": phases,
    }
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, entry)
    if hasattr(engine, "destroy"):
        engine.destroy()
    dist.barrier()
    return gathered if rank == 0 else None


def worker_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gps_ds.bench.zero")
    p.add_argument("--worker", required=True, help="JSON spec")
    p.add_argument("--out", required=True, help="rank 0 writes the gathered per-rank list here")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args(argv)
    ranks = run_rank(json.loads(args.worker))
    if ranks is not None:
        text = json.dumps(ranks)
        Path(args.out).write_text(text)
        print(MARK + text, flush=True)
    return 0


# --------------------------------------------------------------------------- orchestration

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # freed tensors leave RSS
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("GPS_DS_COLLECTIVE_TIMEOUT", "300")
    # A private cache for DeepSpeed's JIT-built CPU comm op: a shared one is rebuilt (~90 s on 2 cores)
    # whenever another process built it with a different toolchain.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gps-ds" / "torch_extensions"))
    # The venv's ninja first: DeepSpeed rebuilds its CPU op when the ninja changes.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def launch(world: int, spec: dict[str, Any], timeout: float, workdir: Path) -> list[dict[str, Any]]:
    """`deepspeed --num_gpus world` of the worker, in its own process group, killed at `timeout`."""
    out, log = workdir / f"ranks{world}.json", workdir / f"ranks{world}.log"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
           "--master_port", str(_free_port()), "--module", "gps_ds.bench.zero",
           "--worker", json.dumps(spec), "--out", str(out)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise BenchError(f"{world} rank(s) did not finish in {timeout:.0f} s (killed); log: {log}") from None
        finally:
            if proc.poll() is None:  # interrupted: leave nothing behind
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc != 0 or not out.exists():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        errs = [ln for ln in lines if "Error" in ln or "error:" in ln]
        tail = (errs or lines or ["no output"])[-1].strip()
        raise BenchError(f"{world} rank(s) failed (exit {rc}): {tail[:300]}; log: {log}")
    return json.loads(out.read_text())


def parse_ranks(text: str) -> list[int]:
    try:
        ranks = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise BenchError(f"--ranks: expected a comma list of positive integers, got '{text}'") from None
    if not ranks or any(r < 1 for r in ranks):
        raise BenchError(f"--ranks: expected a comma list of positive integers, got '{text}'")
    return list(dict.fromkeys(ranks))


def _summary(world: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    def col(key):
        return [r[key] for r in ranks]

    if sorted(r["rank"] for r in ranks) != list(range(world)) or any(r["world"] != world for r in ranks):
        raise BenchError(f"launch of {world} rank(s) reported ranks {sorted(r['rank'] for r in ranks)}")
    tp, sp = col("train_peak_bytes"), col("setup_peak_bytes")
    return {
        "world": world,
        "train_peak_bytes_max": max(tp), "train_peak_bytes_mean": sum(tp) / len(tp),
        "train_peak_rss_bytes_max": max(col("train_peak_rss_bytes")),
        "setup_peak_bytes_max": max(sp), "setup_peak_rss_bytes_max": max(col("setup_peak_rss_bytes")),
        "baseline_rss_bytes_max": max(col("baseline_rss_bytes")),
        "rss_after_train_bytes_max": max(col("rss_after_train_bytes")),
        "local_param_bytes_max": max(r["param_bytes"]["local"] for r in ranks),
        "full_param_bytes": ranks[0]["param_bytes"]["full"],
        "held_after_setup_bytes_max": max(r["rss_after_setup_bytes"] - r["baseline_rss_bytes"] for r in ranks),
        "train_transient_bytes_max": max(r["train_peak_rss_bytes"] - r["rss_after_setup_bytes"] for r in ranks),
        "state_bytes_max": max(r["state_bytes"]["total"] for r in ranks),
        "step_s_median": statistics.median(s for r in ranks for s in r["step_s"]),
        "per_rank": ranks,
    }


def bench_zero(model: str = "vit_base_patch16_224", *, ranks: Sequence[int] = DEFAULT_RANKS, batch: int = 4,
               k: int = 1, steps: int = 3, num_classes: int = 100, img_size: int | None = None,
               threads: int | None = None, seed: int = 0, timeout: float = 900,
               workdir: str | Path | None = None, partitioned: bool = False) -> dict[str, Any]:
    """Launch every world size in turn; one result dict (ratios against the first world size)."""
    from gps_ds.bench.common import machine

    ranks = list(ranks)
    if not ranks or any(int(r) < 1 for r in ranks):
        raise BenchError("--ranks: expected positive integers")
    if batch < 1 or k < 1 or steps < 1 or num_classes < 1:
        raise BenchError("--batch, --k, --steps and --num-classes must be >= 1")
    if timeout <= 0:
        raise BenchError("--timeout must be > 0")
    import timm

    if not timm.is_model(model):
        raise BenchError(f"unknown model '{model}' (not a timm model)")
    spec = dict(model=model, batch=batch, k=k, steps=steps, num_classes=num_classes, img_size=img_size,
                input_size=img_size or 224, threads=threads, seed=seed)
    load_before = machine()["load_average"]
    runs = []
    wd = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="gps-bench-zero-"))
    wd.mkdir(parents=True, exist_ok=True)
    if partitioned:  # the weights every rank loads its slices of (random values, written tensor by tensor)
        from gps_ds.zero_init import write_random_weights

        spec["weights"] = str(write_random_weights(model, num_classes, wd / "weights.safetensors", img_size=img_size,
                                                   seed=seed))
    for n in ranks:
        runs.append(_summary(n, launch(n, spec, timeout, wd)))  # on failure the logs stay in wd
    if not workdir:
        shutil.rmtree(wd, ignore_errors=True)
    base = runs[0]
    for r in runs:
        r["ratio"] = {key: (r[key] / base[key] if base[key] else None)
                      for key in ("train_peak_bytes_max", "train_peak_rss_bytes_max", "setup_peak_bytes_max",
                                  "local_param_bytes_max", "state_bytes_max")}
    mach = machine()
    mach["threads"] = threads or "/".join(str(r["per_rank"][0]["threads"]) for r in runs) + " (per rank at " + "/".join(str(r["world"]) for r in runs) + " ranks: cores // ranks)"
    mach["load_average_before"] = load_before
    mach["load_average_after"] = mach.pop("load_average")
    return {
        "benchmark": "zero", "model": model, "batch_per_rank": batch, "k": k, "steps": steps,
        "setup": "partitioned from construction (zero.Init + per-rank slices of a weights file)" if partitioned
                 else "whole model on every rank, then deepspeed.initialize partitions it",
        "num_classes": num_classes, "input_size": img_size or 224, "ranks": ranks,
        "zero_optimization": dict(ZERO3), "precision": "fp32", "optimizer": "torch AdamW (lr 1e-4, wd 0.05)",
        "memory_kind": "peak RSS (VmHWM), per rank; 'above baseline' subtracts the RSS after imports and "
                       "process-group start, before the model is built",
        "peak_reset": all(p["peak_reset"] for r in runs for p in r["per_rank"]),
        "machine": mach, "runs": runs, "baseline_world": base["world"],
    }


SCALING_BAND = (0.85, 1.15)  # issue #13: the parameters' share of the per-rank peak falls as 1/N within 15%


def scaling(result: dict[str, Any]) -> list[dict[str, Any]]:
    """How much of the parameters' share each peak sheds between consecutive world sizes.

    From world size a to b the per-rank parameter share falls by W/a - W/b (W = the model's
    parameter bytes); `ratio` = the measured drop of the peak above baseline over that. A peak made
    of a fixed part plus the share gives exactly 1. Consecutive pairs, not "from 1 rank": a single
    rank gathers nothing, so ZeRO-3's gather and prefetch buffers (a fixed part of every N > 1) make
    the 1 -> N drop smaller than the share's by their size (`from_first`, reported too)."""
    runs = sorted(result["runs"], key=lambda r: r["world"])
    full = runs[0]["full_param_bytes"]
    rows = []
    for kind, key in (("setup", "setup_peak_bytes_max"), ("training", "train_peak_bytes_max")):
        for a, b in zip(runs, runs[1:]):
            expected = full / a["world"] - full / b["world"]
            first = runs[0]
            rows.append({
                "peak": kind, "from": a["world"], "to": b["world"],
                "drop_bytes": a[key] - b[key], "share_drop_bytes": expected,
                "ratio": (a[key] - b[key]) / expected if expected else None,
                "from_first": ((first[key] - b[key]) / (full / first["world"] - full / b["world"])
                               if a is not first else None),
            })
    lo, hi = SCALING_BAND
    for r in rows:
        r["met"] = r["ratio"] is not None and lo <= r["ratio"] <= hi
    return rows


def scaling_line(result: dict[str, Any]) -> str:
    rows = scaling(result)
    if not rows:
        return "one world size only: no 1/N check"
    parts = []
    for r in rows:
        first = f" (from {result['runs'][0]['world']} rank: {r['from_first']:.2f})" if r["from_first"] is not None else ""
        parts.append(f"{r['peak']} {r['from']}->{r['to']}: {r['ratio']:.2f}{first}")
    lo, hi = SCALING_BAND
    ok = all(r["met"] for r in rows)
    return (f"**1/N check** (measured peak drop / parameter-share drop between world sizes; goal "
            f"{lo:.2f}-{hi:.2f}): {'; '.join(parts)} -> **{'met' if ok else 'missed'}**")


def notes(result: dict[str, Any]) -> str:
    """Bullet lines for the results file: what was run and how memory was measured."""
    z = ", ".join(f"{k}={v}" for k, v in result["zero_optimization"].items())
    lines = [
        f"ZeRO-3 {result['precision']} on CPU ranks (gloo, `deepspeed --num_gpus N`), one launch per world size; "
        f"sparse mode (random K={result['k']} per row), {result['optimizer']}; random inputs "
        f"{result['input_size']}x{result['input_size']}, {result['num_classes']} classes; "
        f"**batch fixed per rank** ({result['batch_per_rank']}), so the global batch grows with the ranks",
        f"zero_optimization: {z}",
        "memory: peak RSS (VmHWM) per rank; *baseline* = RSS after imports and process-group start, before "
        "the model is built; *training peak* = peak over the training steps only (counter reset with "
        "/proc/self/clear_refs after deepspeed.initialize), the steady state; *setup peak* = peak while "
        "building, sparsifying and partitioning the model",
        "*held after setup* = RSS after deepspeed.initialize above the baseline (parameter partition + "
        "DeepSpeed's buffers); *transient in steps* = training peak RSS above that (activations of the batch, "
        "gradients, parameters gathered for the layer being computed)",
        "local params = bytes of parameters this rank holds after training (ZeRO-3 partitions `ds_tensor` + "
        "anything not partitioned); trainable state = the ZeRO-3 optimizer's fp32 partitions of the trainable "
        "parameters + their gradients + AdamW moments; x = ratio against the first row",
        ("setup: partitioned from construction (`--partitioned`): built inside `deepspeed.zero.Init`, each rank "
         "reads only its slices of a weights file (random values) and sparse mode is applied to the partitions"
         if result.get("setup", "").startswith("partitioned") else
         "setup without `--partitioned`: every rank builds the whole model before ZeRO-3 partitions it, so the "
         "setup peak does not fall with the ranks (the trainer partitions from construction when the weights "
         "come from a file: `--partitioned`)"),
    ]
    lines.append(verdict(result))
    lines.append(scaling_line(result))
    if not result.get("peak_reset"):
        lines.append("**/proc/self/clear_refs was not writable: the training peak includes the setup peak**")
    return "\n".join(f"* {ln}" for ln in lines)


def verdict(result: dict[str, Any]) -> str:
    """One sentence on whether the per-rank training peak falls with the number of ranks."""
    runs = result["runs"]
    if len(runs) < 2:
        return "one world size only: nothing to compare"
    peaks = [r["train_peak_bytes_max"] for r in runs]
    worlds = [r["world"] for r in runs]
    falls = all(b < a for a, b in zip(peaks, peaks[1:])) and worlds == sorted(worlds)
    first, last = runs[0], runs[-1]
    drop = (first["train_peak_bytes_max"] - last["train_peak_bytes_max"]) / 2**20
    params_drop = (first["local_param_bytes_max"] - last["local_param_bytes_max"]) / 2**20
    transient = " -> ".join(_mb(r["train_transient_bytes_max"]) for r in runs)
    return (f"**result:** the per-rank training peak above baseline "
            f"{'falls' if falls else '**does not fall monotonically**'} with the ranks: "
            f"{' -> '.join(_mb(p) for p in peaks)} MB at {' -> '.join(map(str, worlds))} ranks, "
            f"{'a drop' if drop >= 0 else 'a rise'} of {abs(drop):.0f} MB from {first['world']} to "
            f"{last['world']} rank(s), next to {params_drop:.0f} MB less parameter partition; the transient "
            f"part of the steps ({transient} MB) cannot fall: it is the activations of the fixed per-rank "
            f"batch plus the gathered parameters and communication buffers of ZeRO-3")


def _mb(b) -> str:
    return f"{b / 2**20:.0f}"


def format_table(result: dict[str, Any]) -> str:
    """Markdown table, one row per world size; x = ratio against the first row."""
    def q(v):
        return "-" if v is None else f"{v:.2f}"

    lines = ["| ranks | training peak above baseline, max / mean (MB) | x | training peak RSS, max (MB) | x "
             "| held after setup (MB) | transient in steps (MB) | setup peak above baseline (MB) | x "
             "| local params (MB) | x | trainable state (MB) | step (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        x = r["ratio"]
        lines.append(
            f"| {r['world']} | {_mb(r['train_peak_bytes_max'])} / {_mb(r['train_peak_bytes_mean'])} "
            f"| {q(x['train_peak_bytes_max'])} | {_mb(r['train_peak_rss_bytes_max'])} | {q(x['train_peak_rss_bytes_max'])} "
            f"| {_mb(r['held_after_setup_bytes_max'])} | {_mb(r['train_transient_bytes_max'])} "
            f"| {_mb(r['setup_peak_bytes_max'])} | {q(x['setup_peak_bytes_max'])} "
            f"| {r['local_param_bytes_max'] / 2**20:.1f} | {q(x['local_param_bytes_max'])} "
            f"| {r['state_bytes_max'] / 2**20:.2f} | {r['step_s_median']:.2f} |")
    return "\n".join(lines)


def section_body(result: dict[str, Any], command: str) -> str:
    """The results-file section: command, machine, notes, table."""
    from gps_ds.bench.report import machine_lines

    return (f"`{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
            f"{machine_lines(result['machine'])}\n{notes(result)}\n\n{format_table(result)}\n")


if __name__ == "__main__":
    sys.exit(worker_main())
