"""`gps-ds bench train`: step time, peak memory and trainable-state bytes per fine-tuning method.

Each method runs in its own subprocess (``python -m gps_ds.bench.train --worker SPEC``) so peak
memory is per method. Step times are then taken in one more subprocess that holds every method's
model and runs their steps in turn, one step each, the order rotating every step
(``run_interleaved``): on this VM a method's step time drifted by 20-50% between processes
minutes apart, while ratios of steps interleaved within seconds were steady (``--separate``
times each method in its own process instead). Step = forward + backward + optimizer step
(AdamW) on random inputs and labels, timed after warm-up steps; the median over all timed steps
of all rounds is reported, as wall clock and as process CPU time.

The memory worker reads the peak RSS over the first max(warmup, 2) steps, with glibc's mmap
threshold at 128 KiB (MALLOC_MMAP_THRESHOLD_) so freed tensors leave RSS; timing runs with
malloc's usual large threshold back (`_malloc_for_timing`). Steps timed under the 128 KiB threshold were
up to 1.6x slower (every activation / AdamW temporary mmapped, page-faulted and unmapped again),
by a different factor per method (CPU time, 1 thread: ViT-S/16 224 px b4 full 1.11x, gps-sparse
1.29x; ViT-Ti/16 at 32 px b2 full 1.6x, frozen 1.0x).
Workers run with OMP_WAIT_POLICY=PASSIVE (unless set): with the default spin-waiting, every
OpenMP region on a shared machine waits, spinning, for a descheduled peer thread, which made
steps 10-200x slower and random per method at 2 threads (see docs/sparse-kernels.md).

Methods:
  full        every parameter
  linear      head only
  bitfit      biases + head
  lora        PEFT LoRA r=8 (alpha 16) on attn.qkv / attn.proj / mlp.fc1 / mlp.fc2, + head
  gps-masked  GPS, random K per row, dense weights with masked gradients (MaskedGradients)
  gps-sparse  GPS, random K per row, sparse modules (apply_sparse)
  frozen      nothing trainable; the input requires grad so the backward still runs through
              every layer (a lower bound for any method that trains something in the first layer)
  decoder     SAM only: the mask decoder (SAM's "linear probing")

SAM models (`sam_vit_b`, `sam_vit_l`, `sam_vit_h`, `sam_small`; segment-anything's modules, no
weights) take random images at `--img-size` (default the model's 1024) and a fixed disc-shaped
target mask; the loss is the recipe's BCE + soft IoU on the full-resolution logits. For SAM,
`bitfit` (encoder biases + mask decoder + no-mask embedding, no encoder weight) is the frozen-weights
lower bound of any method that back-propagates through the encoder. `--grad-checkpointing`
recomputes every backbone block in the backward pass (timm's `set_grad_checkpointing`, SAM's
image-encoder blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

METHODS = ("full", "linear", "bitfit", "lora", "gps-masked", "gps-sparse", "frozen", "decoder")
DEFAULT_METHODS = METHODS[:-1]  # decoder is SAM's
LORA_TARGETS = r"^(?!patch_embed).*\.(qkv|proj|fc1|fc2)$"
ADAM_COPIES = 4  # parameter + gradient + two Adam moments


class BenchError(ValueError):
    pass


# --------------------------------------------------------------------------- worker (one method)

def _prepare(model, method: str, k: int, seed: int):
    """Set up `model` for `method`; returns (optimizer-attach callback or None, selected count)."""
    import torch

    from gps_ds.methods import prepare_model
    from gps_ds.rules import classify

    roles = classify(model)
    if method in ("full", "linear", "bitfit", "decoder"):
        prepare_model(model, roles, method)
        return None, 0
    if method == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        return None, 0
    if method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
        model = inject_adapter_in_model(cfg, model)
        head = set(roles.head)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n or n in head)
        return None, 0
    if method in ("gps-masked", "gps-sparse"):
        from gps_ds.sparse.testing import random_selection

        cands = set(roles.candidates)
        selection = {n: idx for n, idx in random_selection(model, k, seed=seed).items() if n in cands}
        prepared = prepare_model(model, roles, "gps", selection, mode=method.split("-")[1])
        selected = sum(int((idx >= 0).sum()) for idx in selection.values())
        attach = prepared.masked.attach if prepared.masked is not None else None
        return attach, selected
    raise BenchError(f"unknown method '{method}' (expected one of: {', '.join(METHODS)})")


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def trainable_state_bytes(model, optimizer) -> dict[str, int]:
    """Bytes of trainable parameters, their gradients and their optimizer state (scalar `step` excluded)."""
    params = [p for p in model.parameters() if p.requires_grad]
    pb = sum(_tensor_bytes(p) for p in params)
    gb = sum(_tensor_bytes(p.grad) for p in params if p.grad is not None)
    sb = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            sb += sum(_tensor_bytes(v) for v in state.values() if hasattr(v, "numel") and v.dim() > 0)
    return {"params": pb, "grads": gb, "optimizer": sb, "total": pb + gb + sb}


def _malloc_for_timing() -> bool:
    """Give glibc malloc back its usual behaviour for the timed steps: the worker starts with
    MALLOC_MMAP_THRESHOLD_=131072 (for the peak-RSS phase), which also turns off glibc's dynamic
    threshold; 32 MiB is the dynamic threshold's ceiling, i.e. its steady state once tensors have
    been freed. False where it cannot be set (not glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 64 << 20))


def _build(spec: dict[str, Any], method: str) -> dict[str, Any]:
    """Model, optimizer and inputs of one method; ``step`` runs forward + backward + AdamW."""
    import torch
    import torch.nn.functional as F

    from gps_ds.models import create_model

    device = torch.device(spec.get("device", "cpu"))
    torch.manual_seed(spec.get("seed", 0))
    model = create_model(spec["model"], spec.get("num_classes", 1000), img_size=spec.get("img_size"),
                         grad_checkpointing=bool(spec.get("grad_checkpointing")))
    attach, selected = _prepare(model, method, int(spec.get("k", 1)), spec.get("seed", 0))
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05) if params else None
    if optimizer is not None and attach is not None:
        attach(optimizer)
    segmenter = is_sam(spec["model"])
    size = int(model.img_size if segmenter else spec.get("input_size") or 224)
    gen = torch.Generator().manual_seed(1)
    batch = int(spec["batch"])
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    if segmenter:
        from gps_ds.tasks.segmentation_losses import bce_soft_iou_loss as loss_fn

        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        disc = ((yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / 4) ** 2).float()
        y = disc.expand(batch, 1, size, size).contiguous().to(device)
    else:
        loss_fn = F.cross_entropy
        y = torch.randint(0, spec.get("num_classes", 1000), (batch,), generator=gen).to(device)
    if method == "frozen":
        x.requires_grad_(True)

    amp = spec.get("amp")
    if amp not in (None, "bf16", "fp16"):
        raise BenchError(f"--amp: '{amp}' (expected bf16 or fp16)")
    cast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def step() -> None:
        if x.grad is not None:
            x.grad = None
        # --amp: forward under autocast (fp32 weights and optimizer, like torch AMP)
        with torch.autocast(device.type, dtype=cast or torch.float32, enabled=cast is not None):
            out = model(x)
        loss = loss_fn(out.float(), y)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # keep grads allocated: they are part of the state

    return {"step": step, "model": model, "optimizer": optimizer, "params": params, "selected": selected}


def is_sam(model: str) -> bool:
    from gps_ds.models.sam import SAM_MODEL_NAMES

    return model in SAM_MODEL_NAMES


def _timed(step, cuda: bool, device) -> tuple[float, float]:
    """(wall, process CPU) seconds of one step."""
    import torch

    if cuda:
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _imports(spec: dict[str, Any], methods: Sequence[str]) -> None:
    import torch

    threads = spec.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    import timm  # noqa: F401  (imports before the baseline: peak memory counts the model and the steps)

    import gps_ds.sparse  # noqa: F401
    if is_sam(spec["model"]):
        import segment_anything  # noqa: F401
    if "lora" in methods:
        import peft  # noqa: F401


def run_method(spec: dict[str, Any]) -> dict[str, Any]:
    """One method in this process: peak memory over the warm-up steps, then (``steps`` > 0) the
    timed steps with the usual malloc behaviour; returns the measurements."""
    import torch

    from gps_ds.bench.common import proc_status_kib

    method = spec["method"]
    _imports(spec, [method])
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    baseline_kib = proc_status_kib("VmRSS")
    built = _build(spec, method)
    step = built["step"]
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # Phase 1, memory: untimed steps with the small mmap threshold (step 2 is the first one that
    # holds gradients, optimizer state and activations at once).
    warmup, steps = int(spec.get("warmup", 2)), int(spec.get("steps", 5))
    for _ in range(max(warmup, 2)):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        peak_bytes = int(torch.cuda.max_memory_allocated(device))
    else:
        peak_kib = proc_status_kib("VmHWM")
    # Phase 2, time: usual malloc, one step to re-grow the heap, then the timed steps.
    malloc_switched = _malloc_for_timing()
    wall, cpu = [], []
    if steps > 0:
        step()
        for _ in range(steps):
            w, c = _timed(step, cuda, device)
            wall.append(w)
            cpu.append(c)
    out = {
        "method": method,
        "trainable_params": sum(p.numel() for p in built["params"]),
        "selected": built["selected"],
        "state_bytes": trainable_state_bytes(built["model"], built["optimizer"]),
        "wall_s": wall,
        "cpu_s": cpu,
        "threads": torch.get_num_threads(),
        "malloc_switched": malloc_switched,
    }
    if cuda:
        out["peak_bytes"] = peak_bytes
        out["memory_kind"] = "cuda max_memory_allocated"
    else:
        out["peak_bytes"] = max(0, peak_kib - baseline_kib) * 1024
        out["peak_rss_bytes"] = peak_kib * 1024
        out["memory_kind"] = "peak RSS (VmHWM) above the pre-model RSS"
    return out


def run_interleaved(spec: dict[str, Any]) -> dict[str, Any]:
    """Every method of ``spec['methods']`` in this process, timed step by step in turn (the order
    rotates each step), so a slow spell of a shared machine hits all methods alike; returns
    {method: {"wall_s": [...], "cpu_s": [...]}}."""
    import torch

    methods = list(spec["methods"])
    _imports(spec, methods)
    _malloc_for_timing()
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    steps = {m: _build(spec, m)["step"] for m in methods}
    for _ in range(max(int(spec.get("warmup", 2)), 1) + 1):
        for m in methods:
            steps[m]()
    out = {m: {"wall_s": [], "cpu_s": []} for m in methods}
    for i in range(int(spec.get("steps", 5))):
        for m in methods[i % len(methods):] + methods[:i % len(methods)]:
            w, c = _timed(steps[m], cuda, device)
            out[m]["wall_s"].append(w)
            out[m]["cpu_s"].append(c)
    return out


# --------------------------------------------------------------------------- orchestration

def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # freed tensors leave RSS (memory phase only)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning at barriers: see the module docstring
    return env


def _run_subprocess(spec: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "gps_ds.bench.train", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_worker_env(), timeout=timeout)
    what = f"method {spec['method']}" if "method" in spec else f"timing of {', '.join(spec['methods'])}"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"{what} failed (exit {proc.returncode}): {tail[0]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise BenchError(f"{what} printed no result")
    return json.loads(lines[-1])


def _ratio(a, b):
    return None if a is None or not b else a / b


def bench_train(model: str, batch: int, k: int = 1, *, steps: int = 5, warmup: int = 2, rounds: int = 1,
                methods: Sequence[str] = DEFAULT_METHODS, threads: int | None = None, device: str = "cpu",
                num_classes: int = 1000, img_size: int | None = None, seed: int = 0,
                timeout: float | None = None, interleave: bool = True,
                grad_checkpointing: bool = False, amp: str | None = None) -> dict[str, Any]:
    """Per round: every method in its own process for peak memory and trainable state; then the
    step times, with ``interleave`` all methods in one process taking turns step by step
    (``run_interleaved``), else in each method's own process after its memory phase (order
    rotated per round). One result dict."""
    from gps_ds.bench.common import OtherLoad, machine

    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise BenchError(f"unknown method '{bad[0]}' (expected one of: {', '.join(METHODS)})")
    if not methods:
        raise BenchError("no methods to run")
    if steps < 1 or batch < 1 or rounds < 1 or k < 1:
        raise BenchError("--steps, --batch, --rounds and --k must be >= 1")
    if "decoder" in methods and not is_sam(model):
        raise BenchError(f"method 'decoder' is for SAM models (the mask decoder), not '{model}'")
    if "lora" in methods and is_sam(model):
        raise BenchError("method 'lora' is not set up for SAM models in this benchmark")
    threads = threads or os.cpu_count() or 1
    if is_sam(model) and img_size is None:
        from gps_ds.models.sam import SAM_NATIVE_SIZE, SMALL_SAM_DEFAULT_SIZE

        img_size = SMALL_SAM_DEFAULT_SIZE if model == "sam_small" else SAM_NATIVE_SIZE
    base = dict(model=model, batch=batch, k=k, steps=steps, warmup=warmup, threads=threads, device=device,
                num_classes=num_classes, img_size=img_size, input_size=img_size or 224, seed=seed,
                grad_checkpointing=grad_checkpointing, amp=amp)
    load_before = machine(device)["load_average"]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    with OtherLoad() as other:
        for r in range(rounds):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            for m in order:
                spec = {**base, "method": m, "steps": 0 if interleave else steps}
                runs[m].append(_run_subprocess(spec, timeout))
            if interleave:
                timed = _run_subprocess({**base, "methods": order}, timeout)
                for m in order:
                    runs[m][-1].update(timed[m])
    results: dict[str, dict] = {}
    for m in methods:
        rs = runs[m]
        wall = [t for r_ in rs for t in r_["wall_s"]]
        cpu = [t for r_ in rs for t in r_["cpu_s"]]
        results[m] = {
            "step_s": statistics.median(wall),
            "step_cpu_s": statistics.median(cpu),
            "peak_bytes": int(statistics.median(r_["peak_bytes"] for r_ in rs)),
            "state_bytes": rs[0]["state_bytes"]["total"],
            "state_detail": rs[0]["state_bytes"],
            "trainable_params": rs[0]["trainable_params"],
            "selected": rs[0]["selected"],
            "wall_s": wall,
            "cpu_s": cpu,
            "peak_bytes_runs": [r_["peak_bytes"] for r_ in rs],
        }
    full = results.get("full")
    for m, res in results.items():
        res["ratio"] = {key: (_ratio(res[key], full[key]) if full else None)
                        for key in ("step_s", "step_cpu_s", "peak_bytes", "state_bytes")}
    mach = machine(device)
    mach["threads"] = threads
    mach["omp_wait_policy"] = _worker_env()["OMP_WAIT_POLICY"]
    mach["load_average_before"] = load_before
    mach["load_average_after"] = mach.pop("load_average")
    mach["other_load_cores"] = other.cores
    return {
        "benchmark": "train",
        "model": model, "batch": batch, "k": k, "steps": steps, "warmup": warmup, "rounds": rounds,
        "input_size": img_size or 224, "num_classes": num_classes, "interleave": interleave, "amp": amp,
        "grad_checkpointing": grad_checkpointing, "task": "segmentation" if is_sam(model) else "classification",
        "memory_kind": runs[methods[0]][0]["memory_kind"],
        "machine": mach,
        "methods": methods,
        "results": results,
        "baseline": "full" if full else None,
    }


def format_table(result: dict[str, Any]) -> str:
    """Markdown table, ratios vs full side by side."""
    def r(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["| method | trainable params | step wall (ms) | x full | step CPU (ms) | x full | peak mem (MB) | x full "
             "| trainable state (MB) | x full |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["methods"]:
        res = result["results"][m]
        q = res["ratio"]
        lines.append(f"| {m} | {res['trainable_params']:,} | {1e3 * res['step_s']:.1f} | {r(q['step_s'])} "
                     f"| {1e3 * res['step_cpu_s']:.1f} | {r(q['step_cpu_s'])} | {res['peak_bytes'] / 2**20:.0f} "
                     f"| {r(q['peak_bytes'])} | {res['state_bytes'] / 2**20:.2f} | {r(q['state_bytes'])} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:  # worker entry
    p = argparse.ArgumentParser(prog="python -m gps_ds.bench.train")
    p.add_argument("--worker", required=True, help="JSON spec of one method run")
    args = p.parse_args(argv)
    spec = json.loads(args.worker)
    print(json.dumps(run_interleaved(spec) if "methods" in spec else run_method(spec)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
