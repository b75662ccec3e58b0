"""The trainer: selection phase, then training on a DeepSpeed engine, evaluation every epoch,
delta files at every best epoch and at the end, MLflow on rank 0."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gps_ds import distributed as D
from gps_ds.checkpoint import (RunIdentity, TrainState, check_identity, checkpoint_root,
                               latest_tag, load_checkpoint, read_state, restore_rng, save_checkpoint,
                               selection_sha256)
from gps_ds.config import Config, config_to_dict
from gps_ds.delta import extract_delta, save_delta
from gps_ds.evaluation import TrainingError, evaluate
from gps_ds.methods import Prepared, prepare_model, trainable_count
from gps_ds.optim import build_optimizer, build_scheduler
from gps_ds.rules import ParamRoles, classify
from gps_ds.seeding import seed_everything
from gps_ds.tracking import Tracker, progress

RUN_MARKER = "run.json"


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


def model_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False, show_progress: bool = True):
        self.cfg = cfg
        self.resume = resume or cfg.output.resume
        self.overwrite = overwrite or cfg.output.overwrite
        self.out = Path(cfg.output.dir)
        self.show_progress = show_progress

    # -- set-up -------------------------------------------------------------------------------
    def _build(self):
        cfg = self.cfg
        from gps_ds.models import create_model_from_config

        seed_everything(cfg.train.seed)
        self.model = create_model_from_config(cfg)
        self.roles: ParamRoles = classify(self.model, cfg.model.family, cfg.gps.rules)
        head = set(self.roles.head)
        self.backbone_params = sum(p.numel() for n, p in self.model.named_parameters() if n not in head)

    def _selection(self) -> dict[str, torch.Tensor] | None:
        cfg = self.cfg
        if cfg.train.method != "gps":
            return None
        from gps_ds.selection.maskfile import check_fits, load_mask

        mask_path = self.out / "mask.safetensors"
        source = cfg.gps.mask or (mask_path if self.resume and mask_path.exists() else None)
        if source is not None:
            selection, meta = load_mask(source)
            check_fits(selection, self.model)
            if int(meta.get("k", cfg.gps.k)) != cfg.gps.k and cfg.gps.mask is None:
                raise ValueError(f"--resume: the run's mask has K={meta['k']}, the config asks for gps.k={cfg.gps.k}")
            self._copy_mask_from = source if Path(source) != mask_path else None  # after the resume checks
            order = [n for n, _ in self.model.named_parameters() if n in selection]
            return {n: selection[n].long() for n in order}
        from gps_ds.data.loaders import make_score_loader
        from gps_ds.selection.pipeline import run_selection, run_selection_zero, write_selection

        batches = make_score_loader(cfg.data, self.rank, self.world, batch_size_per_rank=self.micro_batch,
                                    two_view=cfg.gps.loss == "supcon")
        bar = progress(total=cfg.gps.max_batches or len(batches), rank=self.rank, enabled=self.show_progress,
                       desc="scoring", unit="batch")
        kwargs = dict(scheme=cfg.gps.scheme, k=cfg.gps.k, loss=cfg.gps.loss, temperature=cfg.gps.temperature,
                      seed=cfg.gps.seed, max_batches=cfg.gps.max_batches, progress=bar)
        if self.world > 1:
            # Every rank scores its own data share and they agree on one selection (per-shard top-K).
            result = run_selection_zero(self.model, self.roles, batches, ds_config=self.ds_config, **kwargs)
            if self.ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
                self._build()  # scoring left the parameters partitioned; start training from the same fresh model
        else:
            result = run_selection(self.model, self.roles, batches, **kwargs)
        bar.close()
        self.selection_seconds = result.seconds
        if self.rank == 0:
            write_selection(str(mask_path), result, self.model, self.roles, k=cfg.gps.k, scheme=cfg.gps.scheme,
                            loss=cfg.gps.loss, model_name=cfg.model.name)
        return result.selection

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import deepspeed

        cfg = self.cfg
        self.rank, self.world = D.init_distributed()
        if self.rank == 0:
            prepare_output_dir(self.out, resume=self.resume, overwrite=self.overwrite)
        D.barrier()
        self.selection_seconds = 0.0
        self._copy_mask_from = None
        ds_config = deepspeed_config(cfg, self.world)
        self.ds_config = ds_config
        self.micro_batch = int(ds_config["train_micro_batch_size_per_gpu"])
        if cfg.train.ema_decay is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
            raise ValueError("train.ema_decay: EMA is not supported under ZeRO-3 (the averaged copy would hold "
                             "only this rank's partition); use ZeRO stage 0-2 or remove ema_decay")
        start = time.perf_counter()
        self._build()
        selection = self._selection()
        prepared = prepare_model(self.model, self.roles, cfg.train.method, selection, cfg.gps.mode)
        self.prepared = prepared
        optimizer = build_optimizer(self.model, cfg.train)
        masked_hook = False
        if prepared.masked is not None:
            from gps_ds.sparse.zero_hook import check_masked_supported, masked_needs_engine_hook

            check_masked_supported(ds_config)
            masked_hook = masked_needs_engine_hook(ds_config)
            # ZeRO / bf16: the gradients are masked on the engine's flat partitions (ZeroMaskedHook);
            # attach still moves the masked params into groups of their own with weight_decay=0.
            prepared.masked.attach(optimizer, mask_on_backward=not masked_hook)
        # Shapes and counts before ZeRO-3 partitions the parameters (they read as empty after).
        counts = trainable_count(self.model, prepared)
        from gps_ds.selection.pipeline import candidate_fingerprint

        self._fingerprint = candidate_fingerprint(self.model, self.roles)
        self._identity = RunIdentity(world_size=self.world, method=cfg.train.method, mode=prepared.mode or "",
                                     k=cfg.gps.k if cfg.train.method == "gps" else 0,
                                     selection_sha256=selection_sha256(selection), fingerprint=self._fingerprint)
        resume_tag = self._resume_point()
        if self._copy_mask_from is not None and self.rank == 0:
            shutil.copyfile(self._copy_mask_from, self.out / "mask.safetensors")
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer, model_parameters=trainable,
                                               config=ds_config)
        self.engine = engine
        self.zero_mask = None
        if masked_hook:
            from gps_ds.sparse.zero_hook import ZeroMaskedHook

            self.zero_mask = ZeroMaskedHook(engine, prepared.masked, self.model)
        from gps_ds.data.loaders import make_eval_loader, make_train_loader

        from gps_ds.data.transforms import build_train_criterion

        train_loader = make_train_loader(cfg.data, self.rank, self.world, batch_size_per_rank=self.micro_batch)
        eval_loader = make_eval_loader(cfg.data, self.rank, self.world, batch_size_per_rank=self.micro_batch)
        steps_per_epoch = max(1, len(train_loader) // engine.gradient_accumulation_steps())
        scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch)
        criterion = build_train_criterion(cfg.data)
        ema = _build_ema(engine.module, cfg.train.ema_decay)

        tracker = Tracker(enabled=cfg.tracking.enabled, rank=self.rank, output_dir=self.out, uri=cfg.tracking.uri,
                          experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name or self.out.name,
                          run_id=self._previous_run_id(resume_tag))
        self._write_run_marker(tracker, counts)
        tracker.log_params(config_to_dict(cfg))
        share = {f"trainable_{k}_percent": 100.0 * v / self.backbone_params for k, v in counts.items()}
        tracker.log_metrics({**{f"trainable_{k}": v for k, v in counts.items()}, **share}, step=0)
        if selection is not None and self.rank == 0:
            from gps_ds.plots import plot_selection_distribution

            plot_selection_distribution(selection, self.out / "selection.png",
                                        f"{cfg.model.name}, K={cfg.gps.k}: selected weights per block")

        dtype = model_dtype(engine)
        device = engine.device
        state = TrainState()
        if resume_tag is not None:
            state = self._restore(engine, resume_tag, ema)
            scheduler.step_update(num_updates=state.step)
        best, history, step = state.best, state.history, state.step
        every = cfg.output.checkpoint_every_steps if cfg.output.checkpoints else 0
        try:
            for epoch in range(state.epoch, cfg.train.epochs):
                engine.train()
                train_loader.set_epoch(epoch)
                first = state.batch if epoch == state.epoch else 0
                if resume_tag is not None and epoch == state.epoch:
                    # The random states are put back once the stream has been wound to where the run stopped.
                    tag = resume_tag
                    train_loader.skip_next(first, then=lambda: restore_rng(self.out, tag, self.rank))
                bar = progress(train_loader, rank=self.rank, enabled=self.show_progress, desc=f"epoch {epoch}",
                               unit="batch", initial=first, total=len(train_loader))
                for consumed, (images, labels) in enumerate(bar, start=first + 1):
                    images, labels = images.to(device, dtype), labels.to(device)
                    loss = criterion(engine(images).float(), labels)
                    value = loss.item()
                    # Every rank stops at the same step when any rank sees a non-finite loss.
                    if not D.all_true(math.isfinite(value), device):
                        seen = f"loss is {value}" if not math.isfinite(value) else "loss is not finite on another rank"
                        raise TrainingError(f"{seen} at step {step} (epoch {epoch}); "
                                            f"the last good delta is kept in {self.out}")
                    boundary = engine.is_gradient_accumulation_boundary()  # asked before step() counts the micro-step
                    engine.backward(loss)
                    engine.step()
                    if boundary:
                        step += 1
                        scheduler.step_update(num_updates=step)
                        if ema is not None:
                            ema.update(engine.module, step=step)
                        tracker.log_metrics({"train_loss": value, "lr": optimizer.param_groups[0]["lr"]}, step)
                        if every and step % every == 0 and consumed < len(train_loader):
                            self._checkpoint(TrainState(epoch, consumed, step, best, history), ema)
                if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                    metrics = self._evaluate_epoch(eval_loader, ema, device, dtype)
                    history.append({"epoch": epoch, **metrics})
                    tracker.log_metrics(metrics, step)
                    top1 = max(metrics["top1"], metrics.get("ema_top1", -1.0))
                    if best is None or top1 > best["top1"]:
                        best = {"epoch": epoch, "top1": top1}
                        self._save_delta("delta_best.safetensors",
                                         engine.module if metrics["top1"] >= top1 else ema.module)
                    self._save_delta("delta_last.safetensors", engine.module)
                    self._write_metrics(history)
                if cfg.output.checkpoints:
                    self._checkpoint(TrainState(epoch + 1, 0, step, best, history), ema)
        except BaseException as err:
            tracker.end("FAILED")
            if D.is_peer_failure(err):
                tag = latest_tag(self.out) if cfg.output.checkpoints else None
                where = f"; the last checkpoint is {checkpoint_root(self.out) / tag}, continue with --resume" if tag else ""
                raise TrainingError(f"lost contact with another rank at step {step} ({str(err).splitlines()[0][:200]})"
                                    f"{where}") from err
            raise
        summary = {
            "method": cfg.train.method, "best_top1": best["top1"] if best else None,
            "best_epoch": best["epoch"] if best else None, "last_top1": history[-1]["top1"] if history else None,
            "trainable": counts, "seconds": round(time.perf_counter() - start, 2),
            "selection_seconds": round(self.selection_seconds, 2), "output": str(self.out),
            "tracking_uri": tracker.uri, "run_id": tracker.run_id,
        }
        tracker.log_metrics({"best_top1": summary["best_top1"] or 0.0}, step)
        self._log_artifacts(tracker)
        tracker.end("FINISHED")
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # -- checkpoints ----------------------------------------------------------------------------
    def _resume_point(self) -> str | None:
        """The checkpoint tag to continue from (checked against this run), or None."""
        if not self.resume:
            return None
        tag = latest_tag(self.out)
        if tag is None:
            if self.rank == 0:
                print(f"gps-ds train: {checkpoint_root(self.out)} holds no checkpoint; training restarts from "
                      f"epoch 0 with the run's selection", file=sys.stderr)
            return None
        _, saved = read_state(self.out, tag)
        check_identity(self._identity, saved, checkpoint_root(self.out) / tag)
        return tag

    def _restore(self, engine, tag: str, ema) -> TrainState:
        state, _ = read_state(self.out, tag)
        load_checkpoint(engine, self.out, tag, self.rank, ema_module=ema.module if ema is not None else None)
        self._write_metrics(state.history)  # drop epochs logged after the checkpoint; they run again
        if self.rank == 0:
            print(f"gps-ds train: resuming from {checkpoint_root(self.out) / tag} (epoch {state.epoch}, "
                  f"batch {state.batch}, step {state.step})", file=sys.stderr)
        return state

    def _checkpoint(self, state: TrainState, ema) -> None:
        save_checkpoint(self.engine, self.out, state, self._identity, self.rank,
                        ema_module=ema.module if ema is not None else None, keep=self.cfg.output.keep_checkpoints)

    def _previous_run_id(self, resume_tag: str | None) -> str | None:
        marker = self.out / RUN_MARKER
        if resume_tag is None or not marker.is_file():
            return None
        return json.loads(marker.read_text()).get("run_id")

    def _write_metrics(self, history: list[dict]) -> None:
        if self.rank == 0:
            lines = "".join(json.dumps(h) + "\n" for h in history)
            tmp = self.out / "metrics.jsonl.tmp"
            tmp.write_text(lines)
            tmp.replace(self.out / "metrics.jsonl")

    def _evaluate_epoch(self, loader, ema, device, dtype) -> dict[str, float]:
        res = evaluate(self.engine.module, loader, device, dtype)
        metrics = {"top1": res.top1, "eval_loss": res.loss}
        if ema is not None:
            ema_res = evaluate(ema.module, loader, device, dtype)
            metrics.update(ema_top1=ema_res.top1, ema_eval_loss=ema_res.loss)
        return metrics

    def _save_delta(self, name: str, module: nn.Module) -> None:
        p = self.prepared
        meta = {"model": self.cfg.model.name, "method": p.method, "k": self.cfg.gps.k if p.method == "gps" else 0,
                "mode": p.mode or "", "num_classes": self.cfg.model.num_classes,
                "fingerprint": self._fingerprint,
                "head": json.dumps(self.roles.head), "backbone_params": self.backbone_params}
        delta = gathered_delta(module, p, meta, self.rank)  # a collective under ZeRO-3: every rank calls it
        if self.rank == 0:
            save_delta(self.out / name, delta)

    def _write_run_marker(self, tracker: Tracker, counts: dict) -> None:
        if self.rank != 0:
            return
        (self.out / "config.json").write_text(json.dumps(config_to_dict(self.cfg), indent=2))
        marker = {"run_id": tracker.run_id, "tracking_uri": tracker.uri, "trainable": counts,
                  "backbone_params": self.backbone_params, "world_size": self.world}
        (self.out / RUN_MARKER).write_text(json.dumps(marker, indent=2))

    def _log_artifacts(self, tracker: Tracker) -> None:
        names = ["config.json", "mask.safetensors", "selection.png", "delta_best.safetensors", "delta_last.safetensors", "metrics.jsonl"]
        tracker.log_artifacts([self.out / n for n in names])


def gathered_delta(module: nn.Module, prepared: Prepared, meta: dict, rank: int = 0):
    """The delta of `module` with FULL tensors also under ZeRO-3: the trained parameters are gathered
    (deepspeed.zero.GatheredParameters, a collective: call it on every rank), rank 0 extracts.
    Returns the Delta on rank 0, None elsewhere."""
    import contextlib

    params = [q for q in module.parameters() if q.requires_grad]
    ctx = contextlib.nullcontext()
    if any(hasattr(q, "ds_id") for q in params):
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with ctx:
        if rank != 0:
            return None
        return extract_delta(module, prepared.whole, prepared.selection if prepared.mode == "masked" else None, meta)


def _build_ema(module: nn.Module, decay: float | None):
    if decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(module, decay=decay)


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, show_progress: bool = True) -> dict:
    return Trainer(cfg, resume=resume, overwrite=overwrite, show_progress=show_progress).run()
