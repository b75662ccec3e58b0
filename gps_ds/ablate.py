"""`gps-ds ablate`: the paper's Table 12 inside gps-ds — one GPS model per selection scheme
(`gps.scheme`) and per scoring loss (`gps.loss`, only for the schemes that score gradients), all
at the same budget (K, epochs, lr, data from one config), trained one after the other in this
process with the Trainer; every run is an MLflow run of the config's experiment.

Writes `<out>/<scheme>[-<loss>]/` (one trainer output folder per run), `<out>/ablation.json` and
`<out>/ablation.md`. A run whose folder already holds a `summary.json` written from the same
config is not trained again (the command resumes after an interruption).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from gps_ds.config import LOSSES, Config, config_to_dict, validate_config
from gps_ds.selection.schemes import SCHEMES

DEFAULT_SCHEMES: tuple[str, ...] = tuple(SCHEMES)
DEFAULT_LOSSES: tuple[str, ...] = ("supcon", "ce")
GRADIENT_SCHEMES: tuple[str, ...] = tuple(s for s, need in SCHEMES.items() if need == "scores")


@dataclass(frozen=True)
class AblationRun:
    scheme: str
    loss: str | None  # None: the scheme scores no gradient, the loss plays no part

    @property
    def name(self) -> str:
        return self.scheme if self.loss is None else f"{self.scheme}-{self.loss}"


def parse_list(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    """`a,b` -> ["a", "b"], each checked against `allowed`; one-line error naming the flag."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ValueError(f"{flag}: empty list (expected some of: {', '.join(allowed)})")
    for item in items:
        if item not in allowed:
            raise ValueError(f"{flag}: unknown value '{item}' (expected some of: {', '.join(allowed)})")
    if len(set(items)) != len(items):
        raise ValueError(f"{flag}: '{text}' names a value twice")
    return items


def plan(schemes: Sequence[str], losses: Sequence[str]) -> list[AblationRun]:
    """Every gradient scheme once per loss; every other scheme once."""
    runs: list[AblationRun] = []
    for scheme in schemes:
        if scheme in GRADIENT_SCHEMES:
            runs.extend(AblationRun(scheme, loss) for loss in losses)
        else:
            runs.append(AblationRun(scheme, None))
    return runs


def run_config(base: Config, run: AblationRun, out: Path) -> Config:
    """`base` with this run's scheme, loss, output folder and MLflow run name."""
    raw = config_to_dict(base)
    raw["gps"]["scheme"] = run.scheme
    if run.loss is not None:
        raw["gps"]["loss"] = run.loss
    raw["output"]["dir"] = str(out / run.name)
    raw["output"]["resume"] = False
    prefix = base.tracking.run_name or "ablate"
    raw["tracking"]["run_name"] = f"{prefix}-{run.name}"
    return validate_config(raw)


def check_base(cfg: Config) -> None:
    if cfg.train.method != "gps":
        raise ValueError(f"train.method is '{cfg.train.method}': ablate compares GPS selection schemes, "
                         f"set train.method=gps")
    if cfg.gps.mask is not None:
        raise ValueError("gps.mask is set: ablate selects with every scheme itself, remove gps.mask")


def _finished(cfg: Config) -> dict[str, Any] | None:
    """The run's summary when its folder holds a finished run of exactly this config."""
    out = Path(cfg.output.dir)
    summary, saved = out / "summary.json", out / "config.json"
    if not (summary.is_file() and saved.is_file()):
        return None
    if json.loads(saved.read_text()) != config_to_dict(cfg):
        return None
    return json.loads(summary.read_text())


def row(run: AblationRun, summary: dict[str, Any]) -> dict[str, Any]:
    metric = summary["metric"]
    return {
        "run": run.name, "scheme": run.scheme, "loss": run.loss, "metric": metric,
        "selected": summary["trainable"]["selected"], "trained": summary["trainable"]["total"],
        "val": (summary.get("val") or {}).get(metric), "test": (summary.get("test") or {}).get(metric),
        "best_epoch": summary["best_epoch"], "select_on": summary["select_on"],
        "seconds": summary["seconds"], "output": summary["output"], "run_id": summary.get("run_id"),
    }


def run_ablation(base: Config, out: str | Path, schemes: Sequence[str] = DEFAULT_SCHEMES,
                 losses: Sequence[str] = DEFAULT_LOSSES, *, resume: bool = True,
                 show_progress: bool = True, log=print) -> dict[str, Any]:
    """Train every planned run (skipping finished ones when `resume`), then write the table + JSON."""
    from gps_ds.engine import Trainer

    check_base(base)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    runs = plan(schemes, losses)
    for i, run in enumerate(runs, start=1):
        cfg = run_config(base, run, out)
        summary = _finished(cfg) if resume else None
        if summary is not None:
            log(f"ablate [{i}/{len(runs)}] {run.name}: finished before, kept ({cfg.output.dir})")
        else:
            log(f"ablate [{i}/{len(runs)}] {run.name}: training ...")
            summary = Trainer(cfg, overwrite=True, show_progress=show_progress).run()
        rows.append(row(run, summary))
    result = {"k": base.gps.k, "epochs": base.train.epochs, "lr": base.train.lr, "model": base.model.name,
              "metric": rows[0]["metric"], "select_on": rows[0]["select_on"],
              "experiment": base.tracking.experiment, "runs": rows}
    (out / "ablation.json").write_text(json.dumps(result, indent=2))
    (out / "ablation.md").write_text(format_table(result) + "\n")
    return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(result: dict[str, Any]) -> str:
    metric = result["metric"]
    val_head = f"val {metric}" if result["select_on"] == "val" else "val (no split)"
    lines = [f"| scheme | loss | selected params | trained params | {val_head} | test {metric} | best epoch | "
             f"seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['scheme']} | {r['loss'] or '-'} | {r['selected']:,} | {r['trained']:,} | "
                     f"{_pct(r['val'])} | {_pct(r['test'])} | {r['best_epoch']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def known_losses() -> tuple[str, ...]:
    return LOSSES
