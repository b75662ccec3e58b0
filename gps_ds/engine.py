"""The trainer: selection phase, then training on a DeepSpeed engine, evaluation, delta files,
MLflow on rank 0. Task-agnostic (gps_ds.tasks) and method-agnostic (gps_ds.methods).

Model selection is honest: with `data.val` the best epoch is chosen on validation and the test
split is evaluated once, at the end, with the best delta; without it the last epoch is the result.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gps_ds import distributed as D
from gps_ds.checkpoint import (RunIdentity, TrainState, atomic_write_text, check_identity, checkpoint_root, latest_tag,
                               load_checkpoint, read_state, restore_rng, save_checkpoint, selection_sha256)
from gps_ds.config import Config, config_to_dict
from gps_ds.delta import Delta, load_delta, save_delta
from gps_ds.evaluation import TrainingError, evaluate_task
from gps_ds.methods import Prepared, get_method
from gps_ds.monitor import StepMonitor, Window
from gps_ds.optim import build_optimizer, build_scheduler, scaled_lr
from gps_ds.rules import ParamRoles, classify
from gps_ds.seeding import seed_everything
from gps_ds.tasks import Task, build_task
from gps_ds.tracking import Tracker, progress

RUN_MARKER = "run.json"
BEST, LAST = "delta_best.safetensors", "delta_last.safetensors"


class OutputDirError(ValueError):
    pass


def prepare_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to write into a folder that already holds a run, unless told to resume or overwrite."""
    marker = out / RUN_MARKER
    if marker.exists() and not (resume or overwrite):
        raise OutputDirError(f"output folder {out} already holds a run; pass --resume to continue it "
                             f"or --overwrite to replace it")
    if resume and not marker.exists():
        raise OutputDirError(f"--resume: output folder {out} holds no run to resume")
    out.mkdir(parents=True, exist_ok=True)


def deepspeed_config(cfg: Config, world: int) -> dict[str, Any]:
    """The user's DeepSpeed section with the few keys the trainer needs filled in."""
    ds = json.loads(json.dumps(cfg.deepspeed))
    ds.setdefault("train_micro_batch_size_per_gpu", 32)
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("zero_optimization", {"stage": 0})
    ds.setdefault("wall_clock_breakdown", False)
    ds.setdefault("gradient_clipping", 0.0)  # DeepSpeed 0.19 would otherwise clip at 1.0 unasked
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"deepspeed.{key} must be a positive integer, got {value!r}")
    total = ds.get("train_batch_size")
    if total is not None and total != micro * accum * world:
        raise ValueError(f"deepspeed.train_batch_size is {total} but train_micro_batch_size_per_gpu x "
                         f"gradient_accumulation_steps x ranks = {micro} x {accum} x {world} = {micro * accum * world}; "
                         f"fix one or drop train_batch_size")
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def model_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


class Trainer:
    """`Trainer(cfg).run()`: set up, select, prepare, train epochs, test, finish."""

    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False, show_progress: bool = True):
        self.cfg = cfg
        self.resume = resume or cfg.output.resume
        self.overwrite = overwrite or cfg.output.overwrite
        self.out = Path(cfg.output.dir)
        self.show_progress = show_progress

    def run(self) -> dict[str, Any]:
        self._start()
        self._build()
        selection = self._selection()
        self._prepare(selection)
        self._open()
        try:
            for epoch in range(self.state.epoch, self.cfg.train.epochs):
                self._train_epoch(epoch)
                self._end_epoch(epoch)
            test = self._final_test()
        except BaseException as err:
            self.tracker.end("FAILED")
            raise self._explain(err) from err
        return self._finish(test)

    # -- set-up ---------------------------------------------------------------------------------
    def _start(self) -> None:
        """Process group, output folder, DeepSpeed config; settings refused before any work."""
        cfg = self.cfg
        self.started = time.perf_counter()
        self.rank, self.world = D.init_distributed()
        self.device = D.accelerator_device()
        if self.rank == 0:
            prepare_output_dir(self.out, resume=self.resume, overwrite=self.overwrite)
        D.barrier()
        self.ds_config = deepspeed_config(cfg, self.world)
        self.micro_batch = int(self.ds_config["train_micro_batch_size_per_gpu"])
        if cfg.train.ema_decay is not None and zero_stage(self.ds_config) == 3:
            raise ValueError("train.ema_decay: EMA is not supported under ZeRO-3 (the averaged copy would hold "
                             "only this rank's partition); use ZeRO stage 0-2 or remove ema_decay")
        self.task: Task = build_task(cfg)
        self.method = get_method(cfg.train.method, cfg.train.method_options)
        self.selection_seconds = 0.0
        self._copy_mask_from: Path | None = None

    def _build(self) -> None:
        from gps_ds.models import create_model_from_config

        from gps_ds.zero_init import build_partitioned, partitioned_wanted, print_report

        seed_everything(self.cfg.train.seed)
        # ZeRO-3: partitioned from construction (no rank holds the whole model); `shapes` is a
        # meta-device twin for what reads full shapes (rules, fingerprint, counts).
        self.partitioned = partitioned_wanted(self.cfg, self.ds_config)
        if self.partitioned:
            self.model, self.shapes, report = build_partitioned(self.cfg, self.ds_config)
            print_report(report)
        else:
            self.model = self.shapes = create_model_from_config(self.cfg)
        self.roles: ParamRoles = classify(self.shapes, self.cfg.model.family, self.cfg.gps.rules)
        head = set(self.roles.head)
        self.backbone_params = sum(p.numel() for n, p in self.shapes.named_parameters() if n not in head)

    def _selection(self) -> dict[str, torch.Tensor] | None:
        """The run's selection: a given mask, the run's own mask on resume, else the scoring pass."""
        if not self.method.needs_selection:
            return None
        cfg = self.cfg
        mask_path = self.out / "mask.safetensors"
        source = cfg.gps.mask or (mask_path if self.resume and mask_path.exists() else None)
        if source is not None:
            return self._load_selection(Path(source), mask_path)
        from gps_ds.selection.pipeline import run_selection, run_selection_zero, write_selection

        batches = self._score_loader()
        bar = progress(total=cfg.gps.max_batches or len(batches), rank=self.rank, enabled=self.show_progress,
                       desc="scoring", unit="batch")
        kwargs = dict(scheme=cfg.gps.scheme, k=cfg.gps.k, loss=cfg.gps.loss, temperature=cfg.gps.temperature,
                      seed=cfg.gps.seed, max_batches=cfg.gps.max_batches, progress=bar,
                      task_loss=self.task.task_score_loss())
        if self.world > 1 or self.partitioned:
            # Every rank scores its own data share and they agree on one selection (per-shard top-K).
            result = run_selection_zero(self.model, self.roles, batches, ds_config=self.ds_config, **kwargs)
            if zero_stage(self.ds_config) == 3 and not self.partitioned:
                self._build()  # scoring left the parameters partitioned; start training from the same fresh model
        else:
            result = run_selection(self.model.to(self.device), self.roles, batches, **kwargs)
        bar.close()
        self.selection_seconds = result.seconds
        if self.rank == 0:
            write_selection(str(mask_path), result, self.shapes, self.roles, k=cfg.gps.k, scheme=cfg.gps.scheme,
                            loss=cfg.gps.loss, model_name=cfg.model.name)
        return result.selection

    def _load_selection(self, source: Path, mask_path: Path) -> dict[str, torch.Tensor]:
        from gps_ds.selection.maskfile import check_fits, check_mask_model, load_mask
        from gps_ds.selection.pipeline import candidate_fingerprint

        selection, meta = load_mask(source)
        try:
            check_fits(selection, self.model)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        check_mask_model(source, meta, candidate_fingerprint(getattr(self, "shapes", self.model), self.roles))
        if int(meta.get("k", self.cfg.gps.k)) != self.cfg.gps.k and self.cfg.gps.mask is None:
            raise ValueError(f"--resume: the run's mask has K={meta['k']}, the config asks for gps.k={self.cfg.gps.k}")
        self._copy_mask_from = source if source != mask_path else None  # copied after the resume checks
        order = [n for n, _ in self.model.named_parameters() if n in selection]
        return {n: selection[n].long() for n in order}

    @property
    def data(self):
        """`cfg.data` with mean/std, crop_pct and interpolation resolved from the model (config values win)."""
        if getattr(self, "_data", None) is None:
            from gps_ds.data.transforms import resolve_data

            self._data = resolve_data(self.cfg.data, self.model)
        return self._data

    def _score_loader(self):
        from gps_ds.data.loaders import make_score_loader

        return make_score_loader(self.data, self.rank, self.world, batch_size_per_rank=self.micro_batch,
                                 two_view=self.cfg.gps.loss == "supcon", device=self.device)

    def _prepare(self, selection: dict[str, torch.Tensor] | None) -> None:
        """The method wraps the model; optimizer and DeepSpeed engine over what it trains."""
        import deepspeed

        cfg = self.cfg
        from gps_ds.selection.pipeline import candidate_fingerprint

        self.fingerprint = candidate_fingerprint(self.shapes, self.roles)  # base names: methods may rename layers
        prepared = self.method.prepare(self.model, self.roles, selection, cfg.gps.mode)
        self.prepared: Prepared = prepared
        global_batch = self.micro_batch * int(self.ds_config["gradient_accumulation_steps"]) * self.world
        optimizer = build_optimizer(self.model, cfg.train, global_batch)
        if cfg.train.lr_scaling != "none" and self.rank == 0:
            print(f"gps-ds train: peak lr {scaled_lr(cfg.train, global_batch):.4g} = train.lr {cfg.train.lr:g} scaled "
                  f"{cfg.train.lr_scaling} by global batch {global_batch} / train.lr_base_batch "
                  f"{cfg.train.lr_base_batch}", file=sys.stderr)
        masked_hook = False
        if prepared.masked is not None:
            from gps_ds.sparse.zero_hook import check_masked_supported, masked_needs_engine_hook

            check_masked_supported(self.ds_config)
            masked_hook = masked_needs_engine_hook(self.ds_config)
            # ZeRO / bf16: the gradients are masked on the engine's flat partitions (ZeroMaskedHook);
            # attach still moves the masked params into groups of their own with weight_decay=0.
            prepared.masked.attach(optimizer, mask_on_backward=not masked_hook)
        # Shapes and counts before ZeRO-3 partitions the parameters (they read as empty after).
        self.counts = self.method.count(self.shapes if self.partitioned else self.model, prepared)
        self.identity = RunIdentity(world_size=self.world, method=cfg.train.method, mode=prepared.mode or "",
                                    k=cfg.gps.k if self.method.needs_selection else 0,
                                    selection_sha256=selection_sha256(selection), fingerprint=self.fingerprint)
        self.resume_tag = self._resume_point()
        if self._copy_mask_from is not None and self.rank == 0:
            shutil.copyfile(self._copy_mask_from, self.out / "mask.safetensors")
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer,
                                                    model_parameters=trainable, config=self.ds_config)
        self.optimizer = optimizer
        self.zero_mask = None
        if masked_hook:
            from gps_ds.sparse.zero_hook import ZeroMaskedHook

            self.zero_mask = ZeroMaskedHook(self.engine, prepared.masked, self.model)
        self.dtype = model_dtype(self.engine)

    def _open(self) -> None:
        """Loaders, schedule, EMA, MLflow run and the position to start from (resume)."""
        from gps_ds.data.loaders import make_eval_loader, make_train_loader

        cfg = self.cfg
        self.train_loader = make_train_loader(self.data, self.rank, self.world, batch_size_per_rank=self.micro_batch,
                                              device=self.device)
        self.select_on = "val" if cfg.data.val is not None else "last"
        self.eval_split = "val" if self.select_on == "val" else "test"
        self.eval_loader = make_eval_loader(self.data, self.rank, self.world, batch_size_per_rank=self.micro_batch,
                                            split=self.eval_split, device=self.device)
        self.steps_per_epoch = max(1, len(self.train_loader) // self.engine.gradient_accumulation_steps())
        self.scheduler = build_scheduler(self.optimizer, cfg.train, self.steps_per_epoch)
        self.ema = _build_ema(self.engine.module, cfg.train.ema_decay)
        global_batch = self.micro_batch * self.world * self.engine.gradient_accumulation_steps()
        self.monitor = StepMonitor(self.device, global_batch)
        self.tracker = Tracker(enabled=cfg.tracking.enabled, rank=self.rank, output_dir=self.out,
                               uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
                               run_name=cfg.tracking.run_name or self.out.name,
                               run_id=self._previous_run_id(self.resume_tag))
        self._write_run_files()
        self.state = TrainState()
        self._resume_batch = 0
        if self.resume_tag is not None:
            self.state = self._restore(self.resume_tag)
            self._resume_batch = self.state.batch
            self.scheduler.step_update(num_updates=self.state.step)

    # -- the loop --------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> None:
        engine, loader, state = self.engine, self.train_loader, self.state
        engine.train()
        loader.set_epoch(epoch)
        first, self._resume_batch = self._resume_batch, 0
        if self.resume_tag is not None and epoch == state.epoch and not self.elastic_resume:
            # The random states are put back once the stream has been wound to where the run stopped.
            tag = self.resume_tag
            loader.skip_next(first, then=lambda: restore_rng(self.out, tag, self.rank))
        bar = progress(loader, rank=self.rank, enabled=self.show_progress, desc=f"epoch {epoch}",
                       unit="batch", initial=first, total=len(loader))
        every_ckpt = self.cfg.output.checkpoint_every_steps if self.cfg.output.checkpoints else 0
        self.monitor.restart_clock()  # images/s of training only, not of the evaluation before
        for consumed, (inputs, targets) in enumerate(bar, start=first + 1):
            inputs, targets = self.task.to_device(inputs, targets, self.device, self.dtype)
            loss = self.task.train_loss(self.task.forward(engine, inputs, targets), targets)
            self.monitor.add_loss(loss, state.step)
            boundary = engine.is_gradient_accumulation_boundary()  # asked before step() counts the micro-step
            engine.backward(loss)
            engine.step()
            if not boundary:
                continue
            state.step += 1
            self.monitor.step_done()
            self.scheduler.step_update(num_updates=state.step)
            if self.ema is not None:
                self.ema.update(engine.module, step=state.step)
            if state.step % self.cfg.train.log_every == 0:
                self._check_and_log(epoch, consumed)
            if every_ckpt and state.step % every_ckpt == 0 and consumed < len(loader):
                self._check_and_log(epoch, consumed)
                self._checkpoint(TrainState(epoch, consumed, state.step, state.best, state.history))
        self._check_and_log(epoch, len(loader))

    def _check_and_log(self, epoch: int, batch: int) -> None:
        """The periodic check (collective): stop every rank on a non-finite loss; log the window."""
        w: Window = self.monitor.check()
        if w.bad_step is not None:
            seen = f"loss is {w.bad_here}" if w.bad_here is not None else "loss is not finite on another rank"
            raise TrainingError(f"{seen} at step {w.bad_step} (epoch {epoch}); the last good delta is kept in {self.out}")
        if not w.steps:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        self.tracker.log_metrics({"train_loss": w.loss, "lr": lr, "images_per_s": w.images_per_s,
                                  "step_seconds": w.step_s}, self.state.step)
        if self.rank == 0 and self.show_progress and not sys.stderr.isatty():  # batch logs: plain lines
            print(f"epoch {epoch} batch {batch}/{len(self.train_loader)} step {self.state.step}: loss {w.loss:.4f} "
                  f"lr {lr:.3g} {w.images_per_s:.1f} img/s {w.step_s:.3f} s/step", file=sys.stderr, flush=True)

    def _end_epoch(self, epoch: int) -> None:
        cfg, state = self.cfg, self.state
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            metrics = self._evaluate(self.eval_loader, self.eval_split)
            state.history.append({"epoch": epoch, **metrics, **self._corrupt_counts()})
            self.tracker.log_metrics({k: v for k, v in state.history[-1].items() if k != "epoch"}, state.step)
            if self.select_on == "val":
                self._keep_if_best(epoch, metrics)
            self._save_delta(LAST, self.engine.module)
            self._write_metrics(state.history)
        if cfg.output.checkpoints:
            self._checkpoint(TrainState(epoch + 1, 0, state.step, state.best, state.history))

    def _evaluate(self, loader, split: str) -> dict[str, float]:
        """The task's metrics on `split` (and of the EMA weights), named `<split>_<metric>`."""
        res = evaluate_task(self.engine.module, loader, self.task, self.device, self.dtype)
        metrics = {f"{split}_{k}": v for k, v in res.items()}
        if self.ema is not None:
            ema = evaluate_task(self.ema.module, loader, self.task, self.device, self.dtype)
            metrics.update({f"ema_{split}_{k}": v for k, v in ema.items()})
        return metrics

    def _keep_if_best(self, epoch: int, metrics: dict[str, float]) -> None:
        key = f"val_{self.task.primary_metric}"
        plain, ema = metrics[key], metrics.get(f"ema_{key}", float("-inf"))
        value = max(plain, ema)
        best = self.state.best
        if best is None or value > best["value"]:
            self.state.best = {"epoch": epoch, "metric": key, "value": value, "ema": ema > plain}
            self._save_delta(BEST, self.ema.module if ema > plain else self.engine.module)
            self.tracker.log_artifacts([self.out / BEST])  # now, so that a run that crashes later keeps it

    def _final_test(self) -> dict[str, float] | None:
        """The test split, once: with validation, the best delta loaded back into the engine's model;
        without, the last epoch's evaluation (already on test)."""
        if self.select_on == "last":
            last = self.state.history[-1] if self.state.history else {}
            self._pictures({"test": self.eval_loader})
            return {k.removeprefix("test_"): v for k, v in last.items() if k.startswith("test_")} or None
        if self.cfg.data.test is None:
            return None
        from gps_ds.data.loaders import make_eval_loader

        self._load_trained(self.out / BEST)
        loader = make_eval_loader(self.data, self.rank, self.world, batch_size_per_rank=self.micro_batch,
                                  split="test", device=self.device)
        test = evaluate_task(self.engine.module, loader, self.task, self.device, self.dtype)
        self.tracker.log_metrics({f"test_{k}": v for k, v in test.items()}, self.state.step)
        self._pictures({"val": self.eval_loader, "test": loader})
        return test

    def _pictures(self, loaders: dict) -> None:
        """Tasks that draw their results (segmentation) do so for the selected model."""
        draw = getattr(self.task, "pictures", None)
        if draw is None:
            return
        paths = [p for split, loader in loaders.items()
                 for p in draw(self.engine.module, loader, self.out, split, self.device, self.dtype)]
        self.tracker.log_artifacts(paths, folder="pictures")

    # -- outputs -------------------------------------------------------------------------------
    def _finish(self, test: dict[str, float] | None) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        best = state.best or {}
        summary = {
            "method": cfg.train.method, "task": self.task.name, "metric": self.task.primary_metric,
            "select_on": self.select_on, "best_epoch": best.get("epoch", cfg.train.epochs - 1),
            "val": self._epoch_metrics(best["epoch"], "val") if best else None,
            "test": test, "trainable": self.counts, "data_corrupt": self._corrupt_counts(),
            "seconds": round(time.perf_counter() - self.started, 2),
            "selection_seconds": round(self.selection_seconds, 2), "output": str(self.out),
            "delta": str(self.out / (BEST if self.select_on == "val" else LAST)),
            "tracking_uri": self.tracker.uri, "run_id": self.tracker.run_id,
        }
        self._log_artifacts()
        self.tracker.end("FINISHED")
        if self.rank == 0:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary

    def _epoch_metrics(self, epoch: int, split: str) -> dict[str, float]:
        entry = next(h for h in self.state.history if h["epoch"] == epoch)
        return {k.removeprefix(f"{split}_"): v for k, v in entry.items() if k.startswith(f"{split}_")}

    def _corrupt_counts(self) -> dict[str, int]:
        """Skipped samples of the training and evaluation streams, summed over ranks (collective)."""
        from gps_ds.data.corrupt import KINDS

        local = [self.train_loader.counter.counts(), self.eval_loader.counter.counts()]
        t = torch.tensor([[c[k] for k in KINDS] for c in local], dtype=torch.float64, device=self.device)
        totals = D.all_reduce_(t).sum(0).tolist()
        out = {f"data_corrupt_{k}": int(v) for k, v in zip(KINDS, totals)}
        out["data_corrupt_total"] = int(sum(totals))
        return out

    def _save_delta(self, name: str, module: nn.Module) -> None:
        meta = {"model": self.cfg.model.name, "method": self.prepared.method, "task": self.task.name,
                "method_options": json.dumps(self.cfg.train.method_options, sort_keys=True),
                "k": self.cfg.gps.k if self.method.needs_selection else 0, "mode": self.prepared.mode or "",
                "num_classes": self.cfg.model.num_classes, "fingerprint": self.fingerprint,
                "head": json.dumps(self.roles.head), "backbone_params": self.backbone_params}
        delta = gathered_delta(module, self.prepared, meta, self.rank)  # a collective under ZeRO-3
        if self.rank == 0:
            save_delta(self.out / name, delta)

    def _load_trained(self, path: Path) -> None:
        """Write a delta of this run back into the engine's model (ZeRO-3: rank 0 reads and the gather
        scatters; otherwise every rank reads it)."""
        module = self.engine.module
        params = [q for q in module.parameters() if q.requires_grad]
        partitioned = any(hasattr(q, "ds_id") for q in params)
        with _gathered(params, modifier_rank=0):
            if self.rank == 0 or not partitioned:  # replicated weights: every rank loads its own copy
                self.method.load_trained(module, self.prepared, load_delta(path))

    def _write_run_files(self) -> None:
        if self.rank != 0:
            return
        # Whole-file replacements (temp file + os.replace): a full disk never leaves a run's files cut.
        atomic_write_text(self.out / "config.json", json.dumps(config_to_dict(self.cfg), indent=2))
        marker = {"run_id": self.tracker.run_id, "tracking_uri": self.tracker.uri, "trainable": self.counts,
                  "backbone_params": self.backbone_params, "world_size": self.world, "task": self.task.name,
                  "data": {k: getattr(self.data, k) for k in ("mean", "std", "crop_pct", "interpolation")}}
        atomic_write_text(self.out / RUN_MARKER, json.dumps(marker, indent=2))
        self.tracker.log_params(config_to_dict(self.cfg))
        share = {f"trainable_{k}_percent": 100.0 * v / self.backbone_params for k, v in self.counts.items()}
        self.tracker.log_metrics({**{f"trainable_{k}": v for k, v in self.counts.items()}, **share}, step=0)
        # What a crashed run must keep: the config and the selection, logged at the start.
        self.tracker.log_artifacts([self.out / "config.json", self.out / "mask.safetensors", self.out / RUN_MARKER])
        if self.prepared.selection is not None:
            from gps_ds.plots import plot_selection_distribution

            tmp = self.out / ".selection.tmp.png"
            plot_selection_distribution(self.prepared.selection, tmp,
                                        f"{self.cfg.model.name}, K={self.cfg.gps.k}: selected weights per block")
            tmp.replace(self.out / "selection.png")

    def _write_metrics(self, history: list[dict]) -> None:
        if self.rank == 0:
            lines = "".join(json.dumps(h) + "\n" for h in history)
            atomic_write_text(self.out / "metrics.jsonl", lines)

    def _log_artifacts(self) -> None:
        names = ["selection.png", LAST, "metrics.jsonl"]  # the best delta: logged whenever written
        self.tracker.log_artifacts([self.out / n for n in names])

    # -- checkpoints and faults ------------------------------------------------------------------
    def _resume_point(self) -> str | None:
        """The checkpoint tag to continue from (checked against this run), or None."""
        self.elastic_resume = False
        if not self.resume:
            return None
        tag = latest_tag(self.out)
        if tag is None:
            if self.rank == 0:
                print(f"gps-ds train: {checkpoint_root(self.out)} holds no checkpoint; training restarts from "
                      f"epoch 0 with the run's selection", file=sys.stderr)
            return None
        state, saved = read_state(self.out, tag)
        folder = checkpoint_root(self.out) / tag
        if saved.get("world_size") != self.world and not self.identity.mismatches({**saved, "world_size": self.world}):
            from gps_ds.elastic import check_elastic

            # Another world size, otherwise the same run: only from the world-size-independent state.
            check_elastic(folder, state, saved.get("world_size"), self.world, self._elastic_reason(), self._global_batch())
            self.elastic_resume = True
            return tag
        check_identity(self.identity, saved, folder)
        return tag

    def _elastic_reason(self) -> str | None:
        from gps_ds.elastic import elastic_reason

        if self.cfg.train.ema_decay is not None:
            return "train.ema_decay is set (the EMA copy is not resharded)"
        return elastic_reason(zero_stage(self.ds_config), self.cfg.train.method, self.prepared.mode or "")

    def _global_batch(self) -> int:
        return self.micro_batch * self.world * int(self.ds_config["gradient_accumulation_steps"])

    def _restore(self, tag: str) -> TrainState:
        state, _ = read_state(self.out, tag)
        if self.elastic_resume:
            from gps_ds.elastic import ELASTIC_FILE, load_elastic

            load_elastic(self.engine, checkpoint_root(self.out) / tag / ELASTIC_FILE)
        else:
            load_checkpoint(self.engine, self.out, tag, self.rank,
                            ema_module=self.ema.module if self.ema is not None else None)
        self._write_metrics(state.history)  # drop epochs logged after the checkpoint; they run again
        if self.rank == 0:
            print(f"gps-ds train: resuming from {checkpoint_root(self.out) / tag} (epoch {state.epoch}, "
                  f"batch {state.batch}, step {state.step})", file=sys.stderr)
        return state

    def _checkpoint(self, state: TrainState) -> None:
        save_checkpoint(self.engine, self.out, state, self.identity, self.rank,
                        ema_module=self.ema.module if self.ema is not None else None,
                        keep=self.cfg.output.keep_checkpoints,
                        elastic_meta=None if self._elastic_reason() else {"global_batch": self._global_batch()})

    def _previous_run_id(self, resume_tag: str | None) -> str | None:
        marker = self.out / RUN_MARKER
        if resume_tag is None or not marker.is_file():
            return None
        return json.loads(marker.read_text()).get("run_id")

    def _explain(self, err: BaseException) -> BaseException:
        """A lost peer becomes one line naming the checkpoint to resume from; anything else as is."""
        if not D.is_peer_failure(err):
            return err
        tag = latest_tag(self.out) if self.cfg.output.checkpoints else None
        where = f"; the last checkpoint is {checkpoint_root(self.out) / tag}, continue with --resume" if tag else ""
        return TrainingError(f"lost contact with another rank at step {self.state.step} "
                             f"({str(err).splitlines()[0][:200]}){where}")


def _gathered(params: list[nn.Parameter], modifier_rank: int | None = None):
    """Full tensors of ZeRO-3 partitioned `params` inside the block (a collective), else nothing."""
    if any(hasattr(q, "ds_id") for q in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def gathered_delta(module: nn.Module, prepared: Prepared, meta: dict, rank: int = 0) -> Delta | None:
    """The delta of `module` with FULL tensors also under ZeRO-3 (a collective: call it on every
    rank). Returns the Delta on rank 0, None elsewhere."""
    with _gathered([q for q in module.parameters() if q.requires_grad]):
        if rank != 0:
            return None
        method = prepared.impl or get_method(prepared.method)
        return method.extract(module, prepared, meta)


def _build_ema(module: nn.Module, decay: float | None):
    if decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(module, decay=decay)


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, show_progress: bool = True) -> dict:
    return Trainer(cfg, resume=resume, overwrite=overwrite, show_progress=show_progress).run()
