"""`gps-ds fewshot`: the paper's Fig. 10 inside gps-ds — accuracy vs k training samples per class
(k in {1, 2, 4, 8, 16} by default) for chosen methods, each cell trained over several seeds (the
seed draws the few-shot subset, `data.seed`, and seeds training, `train.seed`), plotted as
mean ± std.

Every finished cell is appended to `<out>/results.jsonl` with a hash of its config; a rerun skips
the cells already there with the same config (the command resumes after an interruption).
Writes `<out>/<method>/k<k>-s<seed>/` (one trainer output folder per cell), `fewshot.json`,
`fewshot.md` and `fewshot.png`. Every cell is an MLflow run of the config's experiment.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

from gps_ds.config import Config, config_to_dict, validate_config

DEFAULT_SHOTS: tuple[int, ...] = (1, 2, 4, 8, 16)
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
RESULTS = "results.jsonl"


def cell_config(base: Config, method: str, k: int, seed: int, out: Path, lr: float | None = None) -> Config:
    raw = config_to_dict(base)
    raw["train"]["method"] = method
    raw["train"]["seed"] = seed
    if lr is not None:
        raw["train"]["lr"] = lr
    if method != base.train.method:
        raw["train"]["method_options"] = {}
    raw["data"]["few_shot"] = k
    raw["data"]["seed"] = seed
    raw["gps"]["seed"] = seed
    raw["output"]["dir"] = str(out / method / f"k{k}-s{seed}")
    raw["output"]["resume"] = False
    raw["tracking"]["run_name"] = f"{base.tracking.run_name or 'fewshot'}-{method}-k{k}-s{seed}"
    return validate_config(raw)


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def read_results(path: Path) -> list[dict[str, Any]]:
    """The finished cells; a torn last line (interrupted write) is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run_fewshot(base: Config, out: str | Path, methods: Sequence[str], shots: Sequence[int] = DEFAULT_SHOTS,
                seeds: Sequence[int] = DEFAULT_SEEDS, lrs: dict[str, float] | None = None, *, resume: bool = True,
                show_progress: bool = False, log: Callable[[str], None] = print,
                train: Callable[[Config], dict] | None = None) -> dict[str, Any]:
    """Train every (method, k, seed) cell not finished before, then aggregate and plot."""
    if base.task.name == "segmentation" or base.data.recipe == "segmentation":
        raise ValueError("fewshot needs class labels: the config is a segmentation task")
    if train is None:
        from gps_ds.engine import Trainer

        def train(cfg: Config) -> dict:
            return Trainer(cfg, overwrite=True, show_progress=show_progress).run()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS
    if not resume and results_path.exists():
        results_path.unlink()
    done = {(r["method"], r["k"], r["seed"], r["config_hash"]): r for r in read_results(results_path)}
    cells = [(m, k, s) for m in methods for k in shots for s in seeds]
    rows = []
    for i, (method, k, seed) in enumerate(cells, start=1):
        cfg = cell_config(base, method, k, seed, out, (lrs or {}).get(method))
        key = (method, k, seed, config_hash(cfg))
        if key in done:
            log(f"fewshot [{i}/{len(cells)}] {method} k={k} seed={seed}: finished before, kept")
            rows.append(done[key])
            continue
        log(f"fewshot [{i}/{len(cells)}] {method} k={k} seed={seed}: training ...")
        s = train(cfg)
        metric = s["metric"]
        row = {"method": method, "k": k, "seed": seed, "lr": cfg.train.lr, "metric": metric,
               "test": (s.get("test") or {}).get(metric), "val": (s.get("val") or {}).get(metric),
               "trained": s["trainable"]["total"], "seconds": s["seconds"], "output": s["output"],
               "run_id": s.get("run_id"), "config_hash": key[3]}
        with results_path.open("a") as f:  # one line per finished cell: the resume record
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    result = {"model": base.model.name, "methods": list(methods), "shots": list(shots), "seeds": list(seeds),
              "metric": rows[0]["metric"] if rows else None, "curves": aggregate(rows, methods, shots), "runs": rows}
    (out / "fewshot.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "fewshot.md").write_text(format_table(result) + "\n")
    plot_curves(result, out / "fewshot.png")
    return result


def aggregate(rows: Sequence[dict], methods: Sequence[str], shots: Sequence[int]) -> dict[str, list[dict]]:
    """Per method and k: mean and sample standard deviation (n-1; 0 for one seed) of the test metric."""
    curves: dict[str, list[dict]] = {}
    for m in methods:
        points = []
        for k in shots:
            vals = [r["test"] for r in rows if r["method"] == m and r["k"] == k and r["test"] is not None]
            if vals:
                points.append({"k": k, "mean": statistics.fmean(vals),
                               "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)})
        curves[m] = points
    return curves


def plot_curves(result: dict[str, Any], path: Path) -> None:
    from gps_ds.analysis.common import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for m, points in result["curves"].items():
        if points:
            ks = [p["k"] for p in points]
            ax.errorbar(ks, [p["mean"] for p in points], yerr=[p["std"] for p in points], marker="o", capsize=3,
                        label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["shots"], [str(k) for k in result["shots"]])
    ax.set_xlabel("training samples per class (k)")
    ax.set_ylabel(f"test {result['metric']} (mean ± std over {len(result['seeds'])} seeds)")
    ax.set_title(f"few-shot: {result['model']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(result: dict[str, Any]) -> str:
    shots = result["shots"]
    lines = ["| method | " + " | ".join(f"k={k}" for k in shots) + " |", "|---|" + "---|" * len(shots)]
    for m, points in result["curves"].items():
        by_k = {p["k"]: p for p in points}
        cells = [f"{by_k[k]['mean']:.2f} ± {by_k[k]['std']:.2f}" if k in by_k else "-" for k in shots]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ints(text: str, flag: str, minimum: int) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < minimum or len(set(vals)) != len(vals):
        raise ValueError(f"{flag}: expected distinct integers >= {minimum}, got {text!r}")
    return vals


def parse_lrs(text: str | None, methods: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        m, sep, v = item.partition("=")
        if not sep or m not in methods:
            raise ValueError(f"--lr: expected METHOD=LR for methods {', '.join(methods)}, got {item!r}")
        try:
            out[m] = float(v)
        except ValueError:
            raise ValueError(f"--lr {item!r}: {v!r} is not a number") from None
    return out


def add_fewshot_arguments(p) -> None:
    p.add_argument("--config", help="the base run: model, data (with a train split), budget")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--methods", default="gps", help="comma-separated train.method values (default gps)")
    p.add_argument("--shots", default=",".join(map(str, DEFAULT_SHOTS)), help="k values (default 1,2,4,8,16)")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="seeds (default 0,1,2)")
    p.add_argument("--lr", help="per-method learning rates, e.g. gps=0.03,linear=0.1 (default: train.lr)")
    p.add_argument("--out", help="folder for the runs and results (default: <output.dir>-fewshot)")
    p.add_argument("--no-resume", action="store_true", help="train every cell again")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_fewshot, noisy=True)


def cmd_fewshot(args) -> int:
    import sys

    from gps_ds.ablate import parse_list
    from gps_ds.cli import emit
    from gps_ds.config import load_config
    from gps_ds.methods import method_names

    methods = parse_list(args.methods, method_names(), "--methods")
    shots = _ints(args.shots, "--shots", 1)
    seeds = _ints(args.seeds, "--seeds", 0)
    cfg = load_config(args.config, args.overrides)
    out = args.out or f"{cfg.output.dir}-fewshot"
    result = run_fewshot(cfg, out, methods, shots, seeds, parse_lrs(args.lr, methods), resume=not args.no_resume,
                         show_progress=not args.quiet, log=lambda m: print(m, file=sys.stderr, flush=True))
    emit(json.dumps(result) if args.json else f"{format_table(result)}\n\nwrote {out}/fewshot.json, "
         f"{out}/fewshot.md, {out}/fewshot.png ({out}/{RESULTS}: one line per finished cell)")
    return 0
