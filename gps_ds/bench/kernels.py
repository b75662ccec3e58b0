"""`gps-ds bench kernels`: the selected-entry gradient paths side by side, per layer shape, dtype and K.

For each ViT layer shape (positions = batch x tokens) every path that can run on the device is timed
on the same random operands: ``dense`` (g^T x, then the K entries per row), ``gather`` (torch
index_select + multiply + sum), ``triton`` (gps_ds/sparse/triton_kernels.py; CUDA, or CPU under
TRITON_INTERPRET=1 where it is only a correctness check) and on CPU ``fused`` / ``sddmm``. Each
path's result is also compared with a float64 dense reference. The table says which path was
fastest and what the rule of ``settings.choose_linear_grad`` ("auto") picks, so the CUDA rule table
(``CUDA_LINEAR_RULES``) can be set by measurement when a GPU is available.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

# (name, rows R, input width C) of ViT-B/16's Linear layers (ViT-S: the same ratios at 384 wide)
VIT_B_LAYERS = (("qkv", 2304, 768), ("proj", 768, 768), ("fc1", 3072, 768), ("fc2", 768, 3072))
DTYPES = {"float32": "torch.float32", "bfloat16": "torch.bfloat16", "float16": "torch.float16"}


def _dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"--dtypes: unknown dtype '{name}' (use float32, bfloat16, float16)") from None


def _paths(device, dtype) -> list[str]:
    from gps_ds.sparse import native, triton_kernels

    paths = ["dense", "gather"]
    if device.type == "cpu" and dtype.is_floating_point and dtype.itemsize >= 4:
        if native.available():
            paths.append("fused")
        paths.append("sddmm")
    if triton_kernels.available(device):
        paths.append("triton")
    return paths


def _time(fn, device, reps: int, warmup: int) -> float:
    import torch

    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _conv_rows(dev, dtype, dname: str, batch: int, ks: Sequence[int], reps: int, warmup: int, gen,
               patch: int, side: int, channels: int) -> list[dict[str, Any]]:
    """The ViT patch embedding (3 -> channels, patch x patch, stride patch) by conv path."""
    import torch
    import torch.nn.functional as F

    from gps_ds.sparse import settings as S
    from gps_ds.sparse import triton_kernels
    from gps_ds.sparse.conv_kernels import ConvGeometry, conv_backward, conv_grad_dense, conv_grad_gather, conv_grad_unfold
    from gps_ds.sparse.indices import build_plan
    from gps_ds.sparse.testing import random_indices

    geo = ConvGeometry((patch, patch), (patch, patch), (0, 0), (1, 1), 1)
    fan_in = 3 * patch * patch
    x = torch.randn(batch, 3, side, side, generator=gen).to(dtype).to(dev)
    w = torch.randn(channels, 3, patch, patch, generator=gen).to(dtype).to(dev)
    g = torch.randn(batch, channels, side // patch, side // patch, generator=gen).to(dtype).to(dev)
    ref_full = None
    rows = []
    for k in ks:
        if k > fan_in:
            continue
        plan = build_plan(random_indices(channels, fan_in, k, generator=gen).to(dev), None, fan_in, 0.0)
        chunk = S.chunk_elems(dev, x.element_size())
        paths = {"dense": lambda: conv_grad_dense(conv_backward(g, x, w, geo, False, True)[1], plan),
                 "gather": lambda: conv_grad_gather(g, x, plan, geo, chunk),
                 "unfold": lambda: conv_grad_unfold(g, x, plan, geo, chunk)}
        if triton_kernels.available(dev):
            paths["triton"] = lambda: triton_kernels.conv_grad_triton(g, x, plan, geo, chunk)
        if ref_full is None:
            ref_full = torch.nn.grad.conv2d_weight(x.double().cpu(), w.shape, g.double().cpu(), stride=patch)
        ref = ref_full.reshape(channels, -1).gather(1, plan.idx.cpu())
        times, errors = {}, {}
        for name, fn in paths.items():
            errors[name] = float((fn().double().cpu() - ref).abs().max() / (ref.abs().max() + 1e-30))
            times[name] = _time(fn, dev, reps, warmup)
        best = min(times, key=times.get)
        length = (side // patch) ** 2
        auto = S.choose_conv_grad(batch, 3, channels, k, length, patch * patch, 1, dtype, dev)
        rows.append({"dtype": dname, "layer": f"patch_embed {patch}x{patch}/{patch} conv", "positions": batch * length,
                     "rows": channels, "cols": fan_in, "k": k, "ms": {p: 1e3 * t for p, t in times.items()},
                     "rel_error": errors, "fastest": best, "auto": auto,
                     "auto_over_fastest": (times[auto] / times[best]) if auto in times else None})
    return rows


def bench_kernels(device: str = "cpu", batch: int = 64, tokens: int = 197, ks: Sequence[int] = (1, 2, 4, 10, 32),
                  dtypes: Sequence[str] = ("float32", "bfloat16"), layers=VIT_B_LAYERS, reps: int = 10,
                  warmup: int = 3, seed: int = 0, conv: tuple[int, int, int] | None = (16, 224, 768)) -> dict[str, Any]:
    """``conv``: (patch, image side, channels) of a patch-embedding row block, None for none."""
    import torch

    from gps_ds.bench.common import machine
    from gps_ds.sparse import settings as S
    from gps_ds.sparse.linear_kernels import sampled_product
    from gps_ds.sparse.testing import random_indices

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if min(batch, tokens, reps) < 1 or not ks:
        raise ValueError("--batch, --tokens, --reps must be >= 1 and --ks non-empty")
    m = batch * tokens
    gen = torch.Generator().manual_seed(seed)
    rows_out = []
    for dname in dtypes:
        dtype = _dtype(dname)
        for name, r, c in layers:
            g = torch.randn(m, r, generator=gen).to(dtype).to(dev)
            x = torch.randn(m, c, generator=gen).to(dtype).to(dev)
            ref_full = None
            for k in ks:
                if k > c:
                    continue
                idx = random_indices(r, c, k, generator=gen).to(dev)
                chunk = S.chunk_elems(dev, x.element_size())
                times, errors = {}, {}
                for path in _paths(dev, dtype):
                    def run(path=path):
                        return sampled_product(path, g, x, idx, None, chunk)

                    out = run()
                    if ref_full is None:
                        ref_full = g.double().t() @ x.double()  # (R, C) float64, once per layer
                    ref = ref_full.gather(1, idx)
                    errors[path] = float((out.double() - ref).abs().max() / (ref.abs().max() + 1e-30))
                    times[path] = _time(run, dev, reps, warmup)
                best = min(times, key=times.get)
                auto = S.choose_linear_grad(m, r, k, c, dtype, dev)
                rows_out.append({"dtype": dname, "layer": name, "positions": m, "rows": r, "cols": c, "k": k,
                                 "ms": {p: 1e3 * t for p, t in times.items()}, "rel_error": errors,
                                 "fastest": best, "auto": auto,
                                 "auto_over_fastest": (times[auto] / times[best]) if auto in times else None})
            del g, x, ref_full
        if conv is not None:
            rows_out += _conv_rows(dev, dtype, dname, batch, ks, reps, warmup, gen, *conv)
    info = machine(device)
    return {"benchmark": "kernels", "device": device, "batch": batch, "tokens": tokens, "ks": list(ks),
            "dtypes": list(dtypes), "reps": reps, "rows": rows_out, "machine": info,
            "cuda_rules": [list(r) for r in S.CUDA_LINEAR_RULES]}


def format_table(result: dict[str, Any]) -> str:
    paths = sorted({p for row in result["rows"] for p in row["ms"]},
                   key=lambda p: ["dense", "gather", "unfold", "fused", "sddmm", "triton"].index(p))
    head = "| dtype | layer (M x R x C) | K | " + " | ".join(f"{p} ms" for p in paths) + " | fastest | auto | auto / fastest | max rel. error |"
    lines = [head, "|" + "---|" * (len(paths) + 7)]
    for row in result["rows"]:
        cells = " | ".join(f"{row['ms'][p]:.3f}" if p in row["ms"] else "-" for p in paths)
        ratio = "-" if row["auto_over_fastest"] is None else f"{row['auto_over_fastest']:.2f}"
        err = max(row["rel_error"].values())
        lines.append(f"| {row['dtype']} | {row['layer']} ({row['positions']} x {row['rows']} x {row['cols']}) "
                     f"| {row['k']} | {cells} | {row['fastest']} | {row['auto']} | {ratio} | {err:.1e} |")
    return "\n".join(lines)


def section(result: dict[str, Any], command: str) -> tuple[str, str, str]:
    from gps_ds.bench.report import machine_lines

    stamp = result.get("finished") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    m = dict(result["machine"])
    m.setdefault("load_average_before", m.get("load_average"))
    body = (f"`{command}` ({stamp})\n\n{machine_lines(m)}\n* median of {result['reps']} calls after warm-up; "
            f"relative error = max |path - float64 dense| / max |float64 dense| over the K entries\n"
            f"* CUDA rule table at the time: {result['cuda_rules']}\n\n{format_table(result)}\n")
    return (f"kernels:{result['device']}:b{result['batch']}",
            f"Selected-entry gradient kernels ({result['device']}, batch {result['batch']})", body)
