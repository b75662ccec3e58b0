"""Many tasks on one frozen backbone: several task deltas loaded onto one base model, the active
task switched in place in O(selected entries + tensors trained whole), without rebuilding.

`TaskBank(model, roles, deltas)` keeps, per task, the flat positions of its selected entries with
their trained values, its whole tensors (biases, ...) and its own head; it also keeps the base
values of every touched position (the union over tasks). `activate(task)` first writes the base
values back at the previous task's positions and whole tensors, then writes the new task's values
and swaps in its head parameters. The result is exactly the dense merge of that task's delta
(`gps-ds delta merge`), which the tests check prediction for prediction.

Deltas are refused, one line each, when they were trained on another architecture (model name or
candidate fingerprint differ) or by a method whose delta is not entries + whole tensors. Delta
files carry no checksum of the base *weights*, so a delta trained from other weights of the same
architecture cannot be told apart.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from gps_ds.delta import Delta, DeltaError, check_delta_fits, load_delta
from gps_ds.rules import ParamRoles

#: methods whose delta is (selected entries, whole tensors) and merges by plain replacement
SWAPPABLE_METHODS = ("gps", "bitfit", "linear", "full")


def check_compatible(delta: Delta, model: nn.Module, roles: ParamRoles, model_name: str | None,
                     source: str = "delta") -> None:
    """One-line DeltaError when `delta` was made for another architecture than `model`."""
    from gps_ds.selection.pipeline import candidate_fingerprint

    theirs = delta.meta.get("model")
    if model_name and theirs and theirs != model_name:
        raise DeltaError(f"{source} was trained on model '{theirs}', the base is '{model_name}'")
    expected, actual = delta.meta.get("fingerprint"), candidate_fingerprint(model, roles)
    if expected and expected != actual:
        raise DeltaError(f"{source} was trained on another architecture (candidate fingerprint {expected}, "
                         f"the base has {actual})")


def model_with_delta(cfg, delta_path: str | os.PathLike) -> tuple[nn.Module, nn.Module, Delta]:
    """(base model, the same architecture with the delta applied, delta) of a config, checked as
    `gps-ds eval` checks (the delta's own method applies it)."""
    import copy

    from gps_ds.methods import get_method
    from gps_ds.models import create_model_from_config
    from gps_ds.rules import classify

    delta = load_delta(delta_path)
    base = create_model_from_config(cfg)
    roles = classify(base, cfg.model.family, cfg.gps.rules)
    check_compatible(delta, base, roles, cfg.model.name, f"delta {delta_path}")
    method = get_method(delta.meta.get("method", "gps"), json.loads(delta.meta.get("method_options", "{}")))
    tuned = method.apply_delta(copy.deepcopy(base), roles, delta)
    return base.eval(), tuned.eval(), delta


@dataclass
class _Task:
    name: str
    entries: dict[str, tuple[torch.Tensor, torch.Tensor]]  # param -> (flat positions, values)
    whole: dict[str, torch.Tensor]  # non-head tensors trained whole
    head: dict[str, nn.Parameter]  # head tensors (their shape may differ from the base head)
    meta: dict[str, str]

    def size(self) -> int:
        return sum(p.numel() for p, _ in self.entries.values()) + sum(t.numel() for t in self.whole.values())


class TaskBank:
    """Task deltas on one base model, one active at a time (see the module docstring)."""

    def __init__(self, model: nn.Module, roles: ParamRoles, model_name: str | None = None) -> None:
        self.model = model
        self.roles = roles
        self.model_name = model_name
        self.params = dict(model.named_parameters())
        self.head_names = list(roles.head)
        self.base_head = {n: self.params[n] for n in self.head_names}
        self._base_vals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # param -> (sorted positions, values)
        self._base_whole: dict[str, torch.Tensor] = {}
        self.tasks: dict[str, _Task] = {}
        self.active: str | None = None

    # -- loading --------------------------------------------------------------------------------
    def add(self, name: str, delta: Delta, source: str | None = None) -> None:
        source = source or f"task '{name}'"
        if name in self.tasks:
            raise ValueError(f"task '{name}' is loaded twice")
        method = delta.meta.get("method", "gps")
        if method not in SWAPPABLE_METHODS:
            raise DeltaError(f"{source}: method '{method}' adds modules; only {', '.join(SWAPPABLE_METHODS)} "
                             f"deltas swap in place")
        check_compatible(delta, self.model, self.roles, self.model_name, source)
        head = set(json.loads(delta.meta.get("head", "[]")) or self.head_names)
        body = Delta(delta.selected, {n: t for n, t in delta.whole.items() if n not in head})
        try:
            check_delta_fits(body, {n: tuple(p.shape) for n, p in self.params.items()})
        except DeltaError as err:
            raise DeltaError(f"{source}: {err}") from None
        entries = {}
        for pname, (idx, vals) in delta.selected.items():
            fan_in = math.prod(self.params[pname].shape[1:])
            idx = idx.long()
            rows = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)
            valid = idx >= 0
            pos = rows[valid] * fan_in + idx[valid]
            entries[pname] = (pos, vals[valid].float().clone())
        task = _Task(name, entries, {n: t.float().clone() for n, t in body.whole.items()},
                     {n: nn.Parameter(t.float().clone(), requires_grad=False)
                      for n, t in delta.whole.items() if n in head}, dict(delta.meta))
        missing = [n for n in self.head_names if n not in task.head]
        if missing and len(missing) != len(self.head_names):
            raise DeltaError(f"{source}: head tensor '{missing[0]}' is missing")
        self._keep_base(task)
        self.tasks[name] = task

    def _keep_base(self, task: _Task) -> None:
        """Remember the base values at the new task's positions (union over all tasks so far)."""
        was = self.active
        if was is not None:
            self.deactivate()
        with torch.no_grad():
            for pname, (pos, _) in task.entries.items():
                flat = self.params[pname].detach().reshape(-1)
                old_pos, old_val = self._base_vals.get(pname, (torch.zeros(0, dtype=torch.long), torch.zeros(0)))
                union = torch.cat([old_pos, pos]).unique()
                self._base_vals[pname] = (union, flat[union].float().clone())
            for n in task.whole:
                if n not in self._base_whole:
                    self._base_whole[n] = self.params[n].detach().float().clone()
        if was is not None:
            self.activate(was)

    # -- switching ------------------------------------------------------------------------------
    def _base_at(self, pname: str, pos: torch.Tensor) -> torch.Tensor:
        union, vals = self._base_vals[pname]
        return vals[torch.searchsorted(union, pos)]

    @torch.no_grad()
    def deactivate(self) -> None:
        """Back to the base model: base values at the active task's entries and whole tensors."""
        if self.active is None:
            return
        task = self.tasks[self.active]
        for pname, (pos, _) in task.entries.items():
            p = self.params[pname]
            p.view(-1)[pos] = self._base_at(pname, pos).to(p.dtype)
        for n in task.whole:
            self.params[n].copy_(self._base_whole[n])
        self._set_head(self.base_head)
        self.active = None

    @torch.no_grad()
    def activate(self, name: str) -> None:
        if name not in self.tasks:
            raise ValueError(f"unknown task '{name}' (loaded: {', '.join(self.tasks) or 'none'})")
        if self.active == name:
            return
        self.deactivate()
        task = self.tasks[name]
        for pname, (pos, vals) in task.entries.items():
            p = self.params[pname]
            p.view(-1)[pos] = vals.to(p.dtype)
        for n, t in task.whole.items():
            self.params[n].copy_(t)
        if task.head:
            self._set_head(task.head)
        self.active = name

    def _set_head(self, tensors: Mapping[str, nn.Parameter]) -> None:
        """Swap the head's Parameter objects (O(1); a task's head may have its own class count)."""
        modules = dict(self.model.named_modules())
        for n, t in tensors.items():
            mod_name, _, leaf = n.rpartition(".")
            module = modules[mod_name]
            setattr(module, leaf, t)
            if isinstance(module, nn.Linear) and leaf == "weight":
                module.out_features = t.shape[0]
        self.params.update({n: t for n, t in tensors.items()})

    # -- reporting ------------------------------------------------------------------------------
    def shared(self) -> dict[str, Any]:
        """Selected entries per task, shared by every task, in the union, and pairwise shared."""
        from gps_ds.analysis.overlap import compute_overlap

        per_task = {n: t.size() for n, t in self.tasks.items()}
        out: dict[str, Any] = {"tasks": list(self.tasks), "entries_and_whole_per_task": per_task}
        if len(self.tasks) >= 2:
            # flat positions as one row per parameter, fan_in = numel: the code is the position itself
            sels = {n: {p: pos.reshape(1, -1) for p, (pos, _) in t.entries.items()} for n, t in self.tasks.items()}
            ov = compute_overlap(sels, fan_in={p: int(self.params[p].numel()) for s in sels.values() for p in s})
            out.update({"selected_per_task": ov["per_task"], "selected_shared_by_all": ov["shared_by_all"],
                        "selected_union": ov["union"], "jaccard_all": ov["jaccard_all"],
                        "jaccard_pairs": ov["jaccard_pairs"]})
        out["base_values_kept"] = sum(v.numel() for _, v in self._base_vals.values()) + \
            sum(t.numel() for t in self._base_whole.values())
        return out


def load_bank(cfg, tasks: Mapping[str, str | os.PathLike]) -> TaskBank:
    """The config's base model (as training builds it) with every `name -> delta file` loaded."""
    from gps_ds.models import create_model_from_config
    from gps_ds.rules import classify

    model = create_model_from_config(cfg).eval()
    bank = TaskBank(model, classify(model, cfg.model.family, cfg.gps.rules), cfg.model.name)
    for name, path in tasks.items():
        bank.add(name, load_delta(path), f"delta {path} (task '{name}')")
    return bank


def predict_images(bank: TaskBank, cfg, task: str, images: Sequence[str | os.PathLike],
                   topk: int = 1) -> list[dict[str, Any]]:
    """Switch to `task`, classify image files with the config's evaluation transform."""
    from PIL import Image, UnidentifiedImageError

    from gps_ds.data.transforms import build_batch_normalize, build_eval_transform

    transform = build_eval_transform(cfg.data, uint8=True)
    normalize = build_batch_normalize(cfg.data, None)
    batch = []
    for path in images:
        try:
            with Image.open(path) as im:
                batch.append(transform(im.convert("RGB")))
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"image {path}: cannot read ({str(err).splitlines()[0]})") from None
    bank.activate(task)
    with torch.no_grad():
        probs = bank.model(normalize(torch.stack(batch))).softmax(-1)
    p, c = probs.topk(min(topk, probs.shape[1]), dim=1)
    return [{"image": str(path), "task": task, "classes": c[i].tolist(), "probs": [round(float(v), 6) for v in p[i]]}
            for i, path in enumerate(images)]


def parse_task_args(items: Sequence[str]) -> dict[str, str]:
    """`NAME=DELTA` pairs -> {name: path}; one-line errors."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--delta {item!r}: expected NAME=DELTA_FILE")
        if name in out:
            raise ValueError(f"--delta: task '{name}' given twice")
        if not Path(path).is_file():
            raise ValueError(f"--delta {item!r}: file not found: {path}")
        out[name] = path
    return out


def add_serve_arguments(p) -> None:
    p.add_argument("--config", required=True, help="config whose model (and weights) is the shared base; its data "
                                                   "section gives the image transform")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--delta", dest="deltas", action="append", required=True, metavar="NAME=DELTA",
                   help="a task: its name and delta file (repeat for every task)")
    p.add_argument("--request", dest="requests", action="append", required=True, metavar="TASK=IMG[,IMG...]",
                   help="classify these image files with that task (repeat; served in order, switching tasks)")
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_serve_tasks)


def cmd_serve_tasks(args) -> int:
    import time

    from gps_ds.config import load_config

    cfg = load_config(args.config, args.overrides)
    requests = []
    for item in args.requests:
        task, sep, files = item.partition("=")
        if not sep or not files:
            raise ValueError(f"--request {item!r}: expected TASK=IMG[,IMG...]")
        requests.append((task, [f for f in files.split(",") if f]))
    bank = load_bank(cfg, parse_task_args(args.deltas))
    for task, _ in requests:
        if task not in bank.tasks:
            raise ValueError(f"--request: unknown task '{task}' (loaded: {', '.join(bank.tasks)})")
    results, switches = [], []
    for task, files in requests:
        start = time.perf_counter()
        bank.activate(task)
        switches.append(time.perf_counter() - start)
        results += predict_images(bank, cfg, task, files, args.topk)
    report = {"shared": bank.shared(), "predictions": results, "switch_seconds": switches}
    if args.json:
        print(json.dumps(report))
        return 0
    s = report["shared"]
    print(f"{len(bank.tasks)} tasks on one {cfg.model.name}: " + ", ".join(
        f"{n} {c:,} entries+whole" for n, c in s["entries_and_whole_per_task"].items())
        + (f"; {s['selected_shared_by_all']:,} selected entries shared by all" if "selected_shared_by_all" in s else ""))
    for r in results:
        preds = ", ".join(f"{c} ({p:.3f})" for c, p in zip(r["classes"], r["probs"]))
        print(f"{r['task']:>12s}  {r['image']}: {preds}")
    return 0
