"""From a config to a mask file: build the model, score the training data, select, save."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

from gps_ds.count import check_k
from gps_ds.rules import ParamRoles, classify
from gps_ds.seeding import seed_everything
from gps_ds.selection.losses import make_score_loss
from gps_ds.selection.maskfile import param_fingerprint, save_mask, save_scores, selection_stats
from gps_ds.selection.schemes import SCHEMES, select
from gps_ds.selection.scoring import ScoreResult, accumulate_scores


@dataclass
class SelectionResult:
    selection: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor] | None
    samples: int
    seconds: float


def candidate_fingerprint(model: nn.Module, roles: ParamRoles) -> str:
    params = dict(model.named_parameters())
    return param_fingerprint({n: tuple(params[n].shape) for n in roles.candidates})


def needs_data(scheme: str) -> bool:
    return SCHEMES[scheme] == "scores"


def run_selection(
    model: nn.Module,
    roles: ParamRoles,
    batches: Iterable | None,
    *,
    scheme: str,
    k: int,
    loss: str = "supcon",
    temperature: float = 0.07,
    seed: int = 0,
    max_batches: int | None = None,
    progress=None,
    task_loss=None,
) -> SelectionResult:
    """Score (when the scheme needs gradients) and select; single process."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown gps.scheme '{scheme}' (expected one of: {', '.join(SCHEMES)})")
    params = dict(model.named_parameters())
    for n in roles.candidates:
        check_k(n, tuple(params[n].shape), k)
    if not roles.candidates:
        raise ValueError("the model has no candidate weights for GPS (check gps.rules)")
    start = time.perf_counter()
    scores, samples = None, 0
    if needs_data(scheme):
        if batches is None:
            raise ValueError(f"gps.scheme '{scheme}' needs training data (data.train)")
        result: ScoreResult = accumulate_scores(
            model, batches, make_score_loss(loss, temperature, task_loss), roles.candidates, max_batches, progress
        )
        scores, samples = result.scores, result.samples
    weights = {n: params[n].detach() for n in roles.candidates}
    selection = {n: t.cpu() for n, t in select(scheme, scores, weights, k, seed).items()}  # files and digests
    if scores is not None:
        scores = {n: t.cpu() for n, t in scores.items()}
    return SelectionResult(selection, scores, samples, time.perf_counter() - start)


def write_selection(path: str, result: SelectionResult, model: nn.Module, roles: ParamRoles, *,
                    k: int, scheme: str, loss: str, model_name: str) -> dict:
    save_mask(path, result.selection, k=k, scheme=scheme, loss=loss, model=model_name,
              samples=result.samples, fingerprint=candidate_fingerprint(model, roles))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    stats = selection_stats(result.selection, shapes)
    return {"out": path, "selected": stats["total"], "tensors": len(result.selection), "k": k,
            "scheme": scheme, "loss": loss, "samples": result.samples, "seconds": round(result.seconds, 3)}


def select_from_config(cfg, out: str, scores_out: str | None = None, show_progress: bool = True) -> dict:
    """`gps-ds select`: the whole job for one process."""
    from gps_ds.data.loaders import make_score_loader
    from gps_ds.models import create_model_from_config

    if scores_out is not None and not needs_data(cfg.gps.scheme):
        raise ValueError(f"--save-scores: gps.scheme '{cfg.gps.scheme}' computes no gradient scores")
    from gps_ds.distributed import accelerator_device
    from gps_ds.tasks import build_task

    task = build_task(cfg)
    seed_everything(cfg.gps.seed)
    model = create_model_from_config(cfg).to(accelerator_device())
    roles = classify(model, cfg.model.family, cfg.gps.rules)
    batches = None
    if needs_data(cfg.gps.scheme):
        from gps_ds.data.transforms import resolve_data

        batch = int(cfg.deepspeed.get("train_micro_batch_size_per_gpu", 32))
        batches = make_score_loader(resolve_data(cfg.data, model), 0, 1, batch_size_per_rank=batch,
                                    two_view=cfg.gps.loss == "supcon", device=accelerator_device())
    progress = None
    if show_progress and batches is not None:
        from tqdm import tqdm

        total = cfg.gps.max_batches or (len(batches) if hasattr(batches, "__len__") else None)
        progress = tqdm(total=total, desc="scoring", unit="batch", leave=False)
    try:
        result = run_selection(model, roles, batches, scheme=cfg.gps.scheme, k=cfg.gps.k, loss=cfg.gps.loss,
                               temperature=cfg.gps.temperature, seed=cfg.gps.seed,
                               max_batches=cfg.gps.max_batches, progress=progress, task_loss=task.task_score_loss())
    finally:
        if progress is not None:
            progress.close()
    summary = write_selection(out, result, model, roles, k=cfg.gps.k, scheme=cfg.gps.scheme,
                              loss=cfg.gps.loss, model_name=cfg.model.name)
    if scores_out is not None:
        save_scores(scores_out, result.scores)
    return summary


# --------------------------------------------------------------------------- under DeepSpeed ZeRO


def run_selection_zero(
    model: nn.Module,
    roles: ParamRoles,
    batches: Iterable | None,
    *,
    scheme: str,
    k: int,
    loss: str = "supcon",
    temperature: float = 0.07,
    seed: int = 0,
    max_batches: int | None = None,
    progress=None,
    ds_config: dict | None = None,
    gather_scores: bool = False,
    task_loss=None,
):
    """`run_selection` for every rank of a DeepSpeed job (ZeRO 0-3, any world size); collective.

    ``batches`` yields this rank's share of each global batch (e.g. ``make_score_loader(cfg.data,
    rank, world, ...)``); ``ds_config`` is the training DeepSpeed config (its ZeRO stage is used
    for scoring; no optimizer state is allocated).  Returns a
    :class:`~gps_ds.selection.zero_scoring.ZeroScoreResult` (same fields as
    :class:`SelectionResult`) holding the same selection on every rank; ``scores`` only with
    ``gather_scores`` and only on rank 0.  Under ZeRO-3 the model's parameters are left
    partitioned afterwards (a ZeRO-3 training engine accepts them as they are).
    """
    from gps_ds.selection.zero_scoring import score_and_select_zero

    if not roles.candidates:
        raise ValueError("the model has no candidate weights for GPS (check gps.rules)")
    loss_fn = make_score_loss(loss, temperature, task_loss, across_ranks=True) if needs_data(scheme) else None
    if needs_data(scheme) and batches is None:
        raise ValueError(f"gps.scheme '{scheme}' needs training data (data.train)")
    return score_and_select_zero(model, batches if needs_data(scheme) else None, loss_fn, roles.candidates, k,
                                 scheme=scheme, ds_config=ds_config, seed=seed, max_batches=max_batches,
                                 progress=progress, gather_scores=gather_scores)


def select_from_config_zero(cfg, out: str, scores_out: str | None = None, show_progress: bool = True) -> dict | None:
    """`deepspeed launchers/select.py`: the selection job on every rank; rank 0 writes the files.

    Under ZeRO-3 with a weights file the model is built as the trainer builds it: partitioned from
    construction (`gps_ds.zero_init`), so no rank ever holds the whole model; its meta-device twin
    gives the shapes for the rules, the fingerprint and the mask file. Returns the summary on
    rank 0 and None on the other ranks.
    """
    from gps_ds.data.loaders import make_score_loader
    from gps_ds.distributed import init_distributed
    from gps_ds.engine import deepspeed_config
    from gps_ds.models import create_model_from_config
    from gps_ds.selection.zero_scoring import write_selection_rank0
    from gps_ds.zero_init import build_partitioned, partitioned_wanted, print_report

    if scores_out is not None and not needs_data(cfg.gps.scheme):
        raise ValueError(f"--save-scores: gps.scheme '{cfg.gps.scheme}' computes no gradient scores")
    from gps_ds.tasks import build_task

    rank, world = init_distributed()
    ds_config = deepspeed_config(cfg, world)  # the ZeRO config the trainer would use
    task = build_task(cfg)
    seed_everything(cfg.gps.seed)
    if partitioned_wanted(cfg, ds_config, scoring_only=True):
        model, shapes, report = build_partitioned(cfg, ds_config, scoring=needs_data(cfg.gps.scheme))
        print_report(report)
    else:
        model = shapes = create_model_from_config(cfg)
    roles = classify(shapes, cfg.model.family, cfg.gps.rules)
    candidates = list(roles.candidates)
    batches = None
    micro = int(ds_config["train_micro_batch_size_per_gpu"])
    if needs_data(cfg.gps.scheme):
        from gps_ds.data.transforms import resolve_data

        # The real model, not the twin: a SAM model's normalisation is in its pixel_mean/std buffers.
        batches = make_score_loader(resolve_data(cfg.data, model), rank, world, batch_size_per_rank=micro,
                                    two_view=cfg.gps.loss == "supcon")
    progress = None
    if show_progress and rank == 0 and batches is not None:
        from tqdm import tqdm

        total = cfg.gps.max_batches or (len(batches) if hasattr(batches, "__len__") else None)
        progress = tqdm(total=total, desc="scoring", unit="batch", leave=False)
    try:
        result = run_selection_zero(model, roles, batches, scheme=cfg.gps.scheme, k=cfg.gps.k, loss=cfg.gps.loss,
                                    temperature=cfg.gps.temperature, seed=cfg.gps.seed,
                                    max_batches=cfg.gps.max_batches, progress=progress,
                                    ds_config=ds_config, gather_scores=scores_out is not None,
                                    task_loss=task.task_score_loss())
    finally:
        if progress is not None:
            progress.close()
    summary = write_selection_rank0(out, result, shapes, candidates, k=cfg.gps.k, scheme=cfg.gps.scheme,
                                    loss=cfg.gps.loss, model_name=cfg.model.name)
    if scores_out is not None and rank == 0:
        save_scores(scores_out, result.scores)
    return summary
