"""The scoring pass under DeepSpeed ZeRO stages 0-3, any world size, with no optimizer state.

What every rank does
--------------------
1. Scoring engine.  The model is wrapped in :class:`ScoringModule` (``forward(inputs, labels)``
   returns ``loss_fn(model, inputs, labels)``) and handed to ``deepspeed.initialize`` with the
   user's DeepSpeed config (ZeRO stage, buckets, ...) and a client ``torch.optim.SGD(lr=0,
   momentum=0)`` over the candidate weights only.  Only candidates require gradients.  That
   optimizer is never stepped; plain SGD without momentum keeps no state at all, so nothing of
   the size of Adam's ``exp_avg``/``exp_avg_sq`` ever exists (:func:`engine_memory_report`
   measures what the engine does hold; see "What it allocates").
2. Signed sum.  One ``engine(inputs, labels)`` + ``engine.backward(loss)`` per batch and no
   ``engine.step()``: DeepSpeed's own gradient accumulation keeps Σ_b g_b, reduced (averaged)
   over ranks, in each rank's gradient partition.  ``engine.set_gradient_accumulation_boundary``
   is ``False`` for every batch but the last one of the pass and ``True`` for the last; this is
   required under ZeRO-1/2 (measured on DeepSpeed 0.19: with a boundary on every batch the
   partition holds only the last batch's gradient, not the sum) and saves all communication
   under stage 0 and 1 until the last batch.  The last batch is known by looking one batch
   ahead; one tiny ``all_reduce(MIN)`` per batch makes every rank agree on "there is a next
   batch" and "the loss is finite", so ranks with unequal numbers of batches stop together
   (the extra batches are not used) and a NaN on one rank fails every rank instead of hanging.
3. Local fragment of |Σg| per candidate, by stage (DeepSpeed internals relied on):

   * ZeRO-3: ``deepspeed.utils.safe_get_local_grad(p)`` (this rank's flat fp32 slice, padded);
     the slice starts at ``partition_rank * p.partition_numel()`` with ``partition_rank`` the
     rank in ``p.ds_process_group``.
   * ZeRO-1/2: ``p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)`` (the same
     fragment ``safe_get_full_grad`` reads before it all-reduces the whole gradient) at offset
     ``p._hp_mapping.lp_fragment_address.start``; ``p._hp_mapping is None`` when this rank's
     partition holds no part of ``p``.
   * stage 0: every rank holds the whole averaged gradient in ``p.grad``; each takes an even,
     row-aligned share of the rows (``ceil(rows / world)`` rows each).

4. Selection from fragments (no rank ever sees another rank's gradients):

   * ``gps``: :func:`~gps_ds.selection.topk.shard_rows_topk` on each fragment; rows that
     straddle fragment ends are resolved exactly from every rank's partial candidates (value,
     column) — one ``all_gather`` of the packed partials and complete-row headers for all
     tensors together, then one ``all_gather`` of the complete rows' int32 indices.  Every
     rank ends with the full selection (it needs it to train).
   * ``layer``/``net``: each rank takes the top-``rows*K`` of each fragment (``layer``) or the
     top-``N`` over all its fragments (``net``, N = the GPS budget) under the same order
     (score desc, then global index asc); the union of those contains the global answer, so
     one ``all_gather`` of (value, index) candidates per tensor (``layer``) or one in all
     (``net``) gives the exact result.  That gathers up to ``world * selected`` candidates,
     never gradients.
   * ``magnitude``: like ``gps`` on |W| fragments: ZeRO-3 partitions (``p.ds_tensor``) or an
     even share of rows when weights are whole on every rank; no data, no engine.
   * ``random-net``/``random-neuron``: shapes only; every rank draws the same selection as the
     single-process code (same generator, same order); no communication.

   Every rank runs the same collectives in the same order whatever it owns (a rank that owns
   no part of a tensor contributes an empty fragment).

Scale and semantics
-------------------
DeepSpeed averages gradients over ranks, so with equal micro-batches and a loss that is a
mean over samples (cross-entropy) the result is exactly the single-process
:func:`~gps_ds.selection.scoring.accumulate_scores` over the global batches.  For the
supervised contrastive loss each rank's loss sees its own micro-batch (negatives come from the
rank's ``B / world`` samples), as with data-parallel training without a feature all-gather.

What it allocates (fp32, measured with :func:`engine_memory_report` on test_vit, 2-3 ranks)
---------------------------------------------------------------------------------------
No optimizer state: the inner torch optimizer's ``state`` stays empty (AdamW on the same
engine holds 2 fp32 partitions after one step: ``exp_avg``, ``exp_avg_sq``).  What the ZeRO
wrappers keep for any client optimizer, all sized by the *candidate* weights only (frozen
weights get no gradient and no copy), per rank, C = candidate entries, W = world size:

* stage 0: the whole gradients ``p.grad`` (4C bytes); nothing else.
* ZeRO-1/2: fp32 master partition ``single_partition_of_fp32_groups`` (4C/W) + gradient
  partition ``averaged_gradients`` (4C/W), both padded to ZeRO's alignment; during backward
  the local gradients of a reduce bucket (ZeRO-1: all of them until the last batch's
  reduction, as ZeRO-1 always does).
* ZeRO-3: ``fp32_partitioned_groups_flat`` (4C/W) + ``grad_partitions_flat_buffer`` (4C/W) +
  the reduce bucket ``ipg_buckets``.

The reduce bucket (``reduce_bucket_size``, DeepSpeed's default 5e8 entries = 2 GB in fp32) is
capped here at the candidates' size C.  Only the fp32 master partition is pure overhead for
scoring; avoiding it would mean replacing DeepSpeed's gradient partitioning with own hooks.

Precision: scoring runs in fp32 unless ``precision="config"`` keeps the config's bf16 (with
fp32 gradient accumulation; ZeRO stage >= 1 only; at stage 1 DeepSpeed's BF16_Optimizer also
keeps a whole fp32 gradient buffer); fp16 (loss scaling, overflow skips) is refused.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from gps_ds.selection.schemes import SCHEMES, flat_to_padded, gps_budget, rows_and_fan_in, select
from gps_ds.selection.scoring import ScoringError
from gps_ds.selection.topk import (
    ShardTopK,
    assemble_sharded_topk,
    pack_partials,
    rowwise_topk,
    shard_rows_topk,
    unpack_partials,
)

__all__ = [
    "ScoringModule",
    "Fragment",
    "ZeroScoreResult",
    "scoring_ds_config",
    "build_scoring_engine",
    "release_scoring_engine",
    "accumulate_zero",
    "grad_fragments",
    "weight_fragments",
    "select_from_fragments",
    "gather_full",
    "score_and_select_zero",
    "engine_memory_report",
    "shard_batch",
    "write_selection_rank0",
]

ScoreLoss = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- small helpers


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """Where collective buffers live: the accelerator (gloo on a CPU machine: the CPU, which is
    the accelerator there; nccl: the GPU). Not "CPU whenever gloo": the device guard's CPU runs
    stand in for NCCL ones (docs/distributed.md)."""
    from gps_ds.distributed import accelerator_device

    return accelerator_device()


def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """``all_gather`` of equal-shape tensors, returned on the CPU (a list of one in a single process)."""
    if not _distributed():
        return [t.cpu()]
    t = t.to(_comm_device()).contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def _all_gather_var(t: torch.Tensor, lengths: Sequence[int] | None = None) -> list[torch.Tensor]:
    """``all_gather`` of 1-D tensors whose lengths differ per rank (pads to the longest).

    ``lengths`` (every rank's length, when already known) saves the size exchange.
    """
    if not _distributed():
        return [t]
    t = t.reshape(-1).cpu()
    if lengths is None:
        sizes = _all_gather(torch.tensor([t.numel()], dtype=torch.int64))
        lengths = [int(s) for s in sizes]
    longest = max(lengths) if lengths else 0
    buf = torch.zeros(max(longest, 1), dtype=t.dtype)
    buf[: t.numel()] = t
    parts = _all_gather(buf)
    return [p[:n] for p, n in zip(parts, lengths)]


def _agree(flags: Sequence[bool]) -> list[bool]:
    """Logical AND of each flag over all ranks (one small ``all_reduce``)."""
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=_comm_device())
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [bool(v) for v in t.cpu().tolist()]


def _to(obj, device, dtype: torch.dtype | None):
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def shard_batch(batch, rank: int, world_size: int):
    """This rank's contiguous share of a global batch ``(inputs, labels)`` (tensors split on dim 0).

    ``inputs`` may be a tensor or a tuple/list of tensors (SupCon views).  The batch size must
    divide evenly, so that every rank's micro-batch mean weighs the same.
    """
    inputs, labels = batch
    n = int(labels.shape[0])
    if n % world_size:
        raise ValueError(f"global batch of {n} samples does not split evenly over {world_size} ranks")
    per = n // world_size
    sl = slice(rank * per, (rank + 1) * per)

    def cut(x):
        if isinstance(x, torch.Tensor):
            return x[sl]
        if isinstance(x, (list, tuple)):
            return type(x)(cut(v) for v in x)
        return x

    return cut(inputs), labels[sl]


# --------------------------------------------------------------------------- the engine


class ScoringModule(nn.Module):
    """``forward(inputs, labels) = loss_fn(model, inputs, labels)`` — what the scoring engine runs.

    Under ZeRO-3 a loss may call methods of ``model`` other than ``forward`` (SupCon calls
    ``forward_features``/``forward_head``), which skips the hook that gathers ``model``'s own
    direct parameters (timm: ``cls_token``, ``pos_embed``); they are registered as external
    parameters of this wrapper so that its hook gathers them.
    """

    def __init__(self, model: nn.Module, loss_fn: ScoreLoss, zero3: bool = False):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        if zero3:
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter

            for p in model.parameters(recurse=False):
                register_external_parameter(self, p)

    def forward(self, inputs, labels):
        return self.loss_fn(self.model, inputs, labels)


def _stage(ds_config: Mapping[str, Any]) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def scoring_ds_config(ds_config: Mapping[str, Any] | None, *, micro_batch_size: int | None = None,
                      candidate_numel: int | None = None, precision: str = "fp32") -> dict[str, Any]:
    """The DeepSpeed config the scoring engine runs with, derived from the training one.

    Kept: ``zero_optimization`` (stage, buckets, overlap, ...), communication settings.
    Changed: no ``optimizer``/``scheduler`` (the client SGD replaces them), gradient
    accumulation steps 1 (the pass sets the accumulation boundary itself), no
    ``train_batch_size`` consistency check, ``reduce_bucket_size`` capped at the candidates'
    size, ``zero_allow_untested_optimizer`` (SGD is "untested" for ZeRO), fp32 unless
    ``precision="config"``.
    """
    cfg = copy.deepcopy(dict(ds_config or {}))
    for key in ("optimizer", "scheduler", "train_batch_size", "gradient_clipping"):
        cfg.pop(key, None)
    micro = micro_batch_size or cfg.get("train_micro_batch_size_per_gpu") or 1
    cfg["train_micro_batch_size_per_gpu"] = int(micro)
    cfg["gradient_accumulation_steps"] = 1
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("steps_per_print", 10**9)
    cfg["wall_clock_breakdown"] = False
    if precision not in ("fp32", "config"):
        raise ValueError(f"precision must be 'fp32' or 'config', got {precision!r}")
    half = {k: (cfg.get(k) or {}).get("enabled", False) for k in ("fp16", "bf16")}
    if precision == "fp32":
        for key in ("fp16", "bf16", "amp", "torch_autocast"):
            cfg.pop(key, None)
    else:
        if half["fp16"]:
            raise ValueError("scoring in fp16 is not supported (loss scaling skips batches on overflow); "
                             "use bf16 or fp32")
        if half["bf16"]:
            if _stage(cfg) == 0:
                raise ValueError("bf16 scoring needs ZeRO stage >= 1 (DeepSpeed 0.19 accumulates stage-0 bf16 "
                                 "gradients in bf16); score in fp32 (the default) or use ZeRO 1-3")
            cfg.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    zero = dict(cfg.get("zero_optimization") or {})
    zero.setdefault("stage", 0)
    if candidate_numel:
        cap = max(int(candidate_numel), 1)
        zero["reduce_bucket_size"] = int(min(float(zero.get("reduce_bucket_size", 5e8)), cap))
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        # The pass reads gradient partitions on the device; offload would only add copies.
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
    cfg["zero_optimization"] = zero
    return cfg


def _check_candidates(model: nn.Module, candidates: Sequence[str]) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [n for n in candidates if n not in params]
    if missing:
        raise ScoringError(f"candidate parameter '{missing[0]}' is not in the model")
    if not candidates:
        raise ScoringError("no candidate weights to score")
    return {n: params[n] for n in candidates}


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    s = getattr(p, "ds_shape", None)
    return tuple(int(d) for d in (s if s is not None else p.shape))


@contextlib.contextmanager
def _fp32_master_shares_weights():
    """ZeRO-3 without an fp32 master copy of fp32 weights, as DeepSpeed intends.

    DeepSpeed 0.19's stage 3 skips the master copy when the flat partition already has the master
    dtype and ``flat.device == self.device``; ``self.device`` is a string ('cpu', 'cuda:0') and a
    torch.device never equals a string, so it always clones: one more fp32 copy of every
    candidate's partition (a third of a rank's scoring memory, measured). The scoring engine never
    steps, so sharing the weights' storage is safe; this compares devices as devices while the
    engine is built."""
    try:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3
    except ImportError:  # pragma: no cover - DeepSpeed without stage 3
        yield
        return
    original = Stage3._create_fp32_partitions

    def create(self, *args, **kwargs):
        device = self.device
        if isinstance(device, str):
            self.device = torch.device(device)
        try:
            return original(self, *args, **kwargs)
        finally:
            self.device = device

    Stage3._create_fp32_partitions = create
    try:
        yield
    finally:
        Stage3._create_fp32_partitions = original


def build_scoring_engine(model: nn.Module, loss_fn: ScoreLoss, candidates: Sequence[str],
                         ds_config: Mapping[str, Any] | None = None, *, micro_batch_size: int | None = None,
                         precision: str = "fp32"):
    """A DeepSpeed engine that accumulates the candidates' gradients and never steps.

    Only the candidates require gradients (the previous flags are kept in
    ``engine.gps_saved_requires_grad`` and restored by :func:`release_scoring_engine`).
    The optimizer is ``SGD(lr=0, momentum=0)``: no state, and ``step`` is never called.
    """
    import deepspeed

    params = _check_candidates(model, candidates)
    numel = sum(math.prod(_shape(p)) for p in params.values())
    cfg = scoring_ds_config(ds_config, micro_batch_size=micro_batch_size, candidate_numel=numel,
                            precision=precision)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    wanted = set(candidates)
    for n, p in model.named_parameters():
        p.requires_grad_(n in wanted)
    wrapper = ScoringModule(model, loss_fn, zero3=_stage(cfg) == 3)
    trainable = [params[n] for n in candidates]
    optimizer = torch.optim.SGD(trainable, lr=0.0, momentum=0.0, weight_decay=0.0)
    try:
        with _fp32_master_shares_weights():
            engine, _, _, _ = deepspeed.initialize(model=wrapper, optimizer=optimizer, model_parameters=trainable,
                                                   config=cfg)
    except BaseException:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
        raise
    engine.module.eval()  # no dropout / drop-path draws in the scores
    engine.gps_saved_requires_grad = saved
    engine.gps_candidates = list(candidates)
    return engine


def release_scoring_engine(engine) -> None:
    """Remove the engine's hooks (``engine.destroy()``) and restore ``requires_grad`` flags.

    Under ZeRO-3 the model's parameters stay partitioned (``ds_tensor``); a following
    ``deepspeed.initialize`` with ZeRO-3 accepts them as they are.
    """
    saved = getattr(engine, "gps_saved_requires_grad", None)
    model = engine.module.model if isinstance(engine.module, ScoringModule) else engine.module
    optimizer = getattr(engine, "optimizer", None)
    if hasattr(engine, "destroy"):
        engine.destroy()
    for p in model.parameters():
        p.grad = None
        # ZeRO-3 points every parameter it optimizes at its optimizer (deepspeed.utils.safe_get_*);
        # for the frozen weights that pointer would outlive the scoring engine.
        if optimizer is not None and getattr(p, "_z3_optimizer", None) is optimizer:
            del p._z3_optimizer
    # DeepSpeed's module hooks and autograd-function classes keep the engine reachable after
    # destroy(); its ZeRO-3 gradient partitions (4 bytes per candidate entry / world) are freed here,
    # since the engine is never used again. The weights live in another buffer (lp_param_buffer).
    grads = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if isinstance(grads, torch.Tensor):
        grads.untyped_storage().resize_(0)
    if saved:
        for n, p in model.named_parameters():
            if n in saved:
                p.requires_grad_(saved[n])


def _engine_dtype(engine) -> torch.dtype | None:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return None


@dataclass
class PassStats:
    batches: int
    samples: int
    seconds: float


def accumulate_zero(engine, batches: Iterable, *, max_batches: int | None = None, progress=None) -> PassStats:
    """Forward + backward of every batch on the scoring engine, no step: Σ_b g_b in the partitions.

    ``batches`` yields this rank's ``(inputs, labels)``.  All ranks run the same number of
    batches: the minimum over ranks (agreed on with one small all_reduce per batch).
    """
    if not isinstance(engine.module, ScoringModule):
        raise TypeError("accumulate_zero needs an engine from build_scoring_engine (its module is a ScoringModule)")
    start = time.perf_counter()
    device, dtype = engine.device, _engine_dtype(engine)
    it = iter(batches)
    limit = max_batches if max_batches is not None else math.inf

    def fetch(count: int):
        if count >= limit:
            return None
        try:
            return next(it)
        except StopIteration:
            return None

    cur = fetch(0)
    (have,) = _agree([cur is not None])
    if not have:
        raise ScoringError("the scoring pass saw no batches: the training data is empty (on at least one rank)")
    n_batches = n_samples = 0
    while cur is not None:
        inputs, labels = cur
        nxt = fetch(n_batches + 1)
        loss = engine(_to(inputs, device, dtype), _to(labels, device, None))
        value = float(loss.detach().float())
        has_next, finite = _agree([nxt is not None, math.isfinite(value)])
        if not finite:
            raise ScoringError(f"scoring loss is not finite at batch {n_batches} (on at least one rank; "
                               f"here {value})")
        # Boundary only on the last backward of the pass: ZeRO-1/2 sum the micro-batches up to it.
        engine.set_gradient_accumulation_boundary(not has_next)
        engine.backward(loss)
        n_batches += 1
        n_samples += int(labels.shape[0])
        if progress is not None:
            progress.update(1)
        cur = nxt if has_next else None
    samples = n_samples
    if _distributed():
        t = torch.tensor([n_samples], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(t)
        samples = int(t.cpu())
    return PassStats(n_batches, samples, time.perf_counter() - start)


# --------------------------------------------------------------------------- fragments


@dataclass
class Fragment:
    """This rank's contiguous piece of a candidate flattened to 1-D.

    ``values`` (1-D, possibly longer than the valid part: entries at global positions >=
    ``numel`` are padding) starts at global flat offset ``start``.  ``values`` is None when
    this rank holds no part of the tensor.
    """

    shape: tuple[int, ...]
    start: int
    values: torch.Tensor | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def valid(self) -> int:
        if self.values is None:
            return 0
        return max(0, min(self.values.numel(), self.numel - self.start))

    def valid_values(self) -> torch.Tensor:
        if self.values is None:
            return torch.empty(0)
        return self.values.reshape(-1)[: self.valid]


def _row_share(shape: tuple[int, ...], rank: int, world: int) -> tuple[int, int]:
    """(start, length) of this rank's even, row-aligned share of a whole tensor."""
    rows, fan_in = rows_and_fan_in("?", shape)
    per = -(-rows // world)
    r0 = min(rows, rank * per)
    r1 = min(rows, r0 + per)
    return r0 * fan_in, (r1 - r0) * fan_in


def _whole_fragment(full: torch.Tensor | None, shape: tuple[int, ...]) -> Fragment:
    rank, world = _world()
    start, length = _row_share(shape, rank, world)
    if length == 0:
        return Fragment(shape, start, None)
    if full is None:  # a candidate that got no gradient: score 0
        return Fragment(shape, start, torch.zeros(length))
    return Fragment(shape, start, full.detach().reshape(-1)[start : start + length])


def grad_fragments(engine, names: Sequence[str] | None = None) -> dict[str, Fragment]:
    """This rank's piece of each candidate's accumulated gradient (signed, fp32), by ZeRO stage."""
    import deepspeed

    model = engine.module.model if isinstance(engine.module, ScoringModule) else engine.module
    names = list(names if names is not None else engine.gps_candidates)
    params = dict(model.named_parameters())
    stage = int(engine.zero_optimization_stage())
    # bf16 at stage 0 runs DeepSpeed's BF16_Optimizer, which partitions like ZeRO-1 (_hp_mapping).
    hp_linked = stage == 0 and type(engine.optimizer).__name__ == "BF16_Optimizer"
    out: dict[str, Fragment] = {}
    for n in names:
        p = params[n]
        shape = _shape(p)
        if stage == 3:
            g = deepspeed.utils.safe_get_local_grad(p)
            prank = dist.get_rank(group=p.ds_process_group) if _distributed() else 0
            start = prank * int(p.partition_numel())
            frag = Fragment(shape, start, None if g is None else g.detach().reshape(-1).float())
            if frag.valid == 0:
                frag = Fragment(shape, start, None)
            out[n] = frag
        elif stage in (1, 2) or hp_linked:
            hm = getattr(p, "_hp_mapping", None)
            if hm is None:
                out[n] = Fragment(shape, 0, None)
                continue
            addr = hm.lp_fragment_address
            g = hm.get_lp_grad_fragment(p._index_in_param_group).detach().reshape(-1).float()
            if g.numel() != addr.numel:
                # bf16 optimizer keeps a whole-tensor buffer; this rank owns only its fragment.
                g = g.narrow(0, addr.start, addr.numel)
            out[n] = Fragment(shape, int(addr.start), g)
        else:
            out[n] = _whole_fragment(p.grad, shape)
    return out


def weight_fragments(model: nn.Module, names: Sequence[str]) -> dict[str, Fragment]:
    """This rank's piece of each weight: its ZeRO-3 partition, else an even share of rows."""
    params = dict(model.named_parameters())
    out = {}
    for n in names:
        p = params[n]
        shape = _shape(p)
        if hasattr(p, "ds_id") and hasattr(p, "ds_tensor"):
            prank = dist.get_rank(group=p.ds_process_group) if _distributed() else 0
            start = prank * int(p.partition_numel())
            frag = Fragment(shape, start, p.ds_tensor.detach().reshape(-1).float())
            out[n] = frag if frag.valid else Fragment(shape, start, None)
        else:
            out[n] = _whole_fragment(p.detach(), shape)
    return out


# --------------------------------------------------------------------------- selection


def _gps_from_fragments(frags: Mapping[str, Fragment], k: int) -> dict[str, torch.Tensor]:
    names = list(frags)
    width = 2 + 2 * (2 + 2 * k)  # first_row, n_complete, packed partials (2 slots)
    header = torch.full((len(names), width), -1.0, dtype=torch.float64)
    completes = []
    for i, n in enumerate(names):
        f = frags[n]
        rows, fan_in = rows_and_fan_in(n, f.shape)
        if f.values is None or f.valid == 0:
            r = ShardTopK(0, torch.empty((0, k), dtype=torch.long), [])
        else:
            r = shard_rows_topk(f.valid_values().abs(), f.start, f.numel, fan_in, k)
        header[i, 0] = float(r.first_row)
        header[i, 1] = float(r.complete.shape[0])
        header[i, 2:] = pack_partials(r.partials, k).reshape(-1)
        completes.append(r.complete.to("cpu", torch.int32).reshape(-1))
    flat = torch.cat(completes) if completes else torch.empty(0, dtype=torch.int32)
    headers = _all_gather(header)  # collective 1: headers + straddling rows' candidates
    lengths = [int(h[:, 1].sum().item()) * k for h in headers]
    parts = _all_gather_var(flat, lengths)  # collective 2: complete rows' indices
    out: dict[str, torch.Tensor] = {}
    per_rank_offsets = [0] * len(headers)
    for i, n in enumerate(names):
        rows, _ = rows_and_fan_in(n, frags[n].shape)
        results = []
        for w, (h, part) in enumerate(zip(headers, parts)):
            first, cnt = int(h[i, 0]), int(h[i, 1])
            o = per_rank_offsets[w]
            complete = part[o : o + cnt * k].long().view(cnt, k)
            per_rank_offsets[w] = o + cnt * k
            results.append(ShardTopK(first, complete, unpack_partials(h[i, 2:].view(2, 2 + 2 * k), k)))
        out[n] = assemble_sharded_topk(results, rows, k)
    return out


def _merge_top(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` best (value desc, index asc) among candidate pairs; ascending."""
    o = torch.sort(index, stable=True).indices
    values, index = values[o], index[o]
    o = torch.sort(values, descending=True, stable=True).indices
    return torch.sort(index[o[:n]]).values


def _gather_candidates(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    packed = torch.stack([values.to(torch.float64), index.to(torch.float64)]).t().reshape(-1)
    parts = _all_gather_var(packed)
    allc = torch.cat(parts).view(-1, 2) if parts else torch.empty((0, 2), dtype=torch.float64)
    return allc[:, 0], allc[:, 1].long()


def _local_top(values: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``n`` entries of a 1-D vector under (value desc, position asc): (values, positions)."""
    n = min(n, values.numel())
    if n == 0:
        return values[:0], torch.empty(0, dtype=torch.long)
    pos = rowwise_topk(values.view(1, -1), n)[0]
    return values[pos], pos


def _layer_from_fragments(frags: Mapping[str, Fragment], k: int) -> dict[str, torch.Tensor]:
    out = {}
    for n, f in frags.items():  # one variable-size all_gather (+ its size exchange) per tensor
        rows, fan_in = rows_and_fan_in(n, f.shape)
        v, pos = _local_top(f.valid_values().abs().double(), rows * k)
        vals, idx = _gather_candidates(v, pos + f.start)
        out[n] = flat_to_padded(_merge_top(vals, idx, rows * k), rows, fan_in)
    return out


def _net_from_fragments(frags: Mapping[str, Fragment], k: int) -> dict[str, torch.Tensor]:
    shapes = {n: f.shape for n, f in frags.items()}
    budget = gps_budget(shapes, k)
    offsets, off = {}, 0
    for n, s in shapes.items():
        offsets[n] = off
        off += math.prod(s)
    vals = [f.valid_values().abs().double() for f in frags.values()]
    glob = [torch.arange(f.valid, dtype=torch.long) + f.start + offsets[n] for n, f in frags.items()]
    cat_v = torch.cat(vals) if vals else torch.empty(0, dtype=torch.float64)
    cat_i = torch.cat(glob) if glob else torch.empty(0, dtype=torch.long)
    # Fragments are concatenated in candidate order, so position order == global index order.
    v, pos = _local_top(cat_v, budget)
    all_v, all_i = _gather_candidates(v, cat_i[pos])
    chosen = _merge_top(all_v, all_i, budget)
    out = {}
    for n, s in shapes.items():
        rows, fan_in = rows_and_fan_in(n, s)
        lo = torch.searchsorted(chosen, offsets[n])
        hi = torch.searchsorted(chosen, offsets[n] + rows * fan_in)
        out[n] = flat_to_padded(chosen[lo:hi] - offsets[n], rows, fan_in)
    return out


def select_from_fragments(scheme: str, frags: Mapping[str, Fragment], k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The selection of ``scheme`` from every rank's fragments (collective; same on every rank).

    ``frags`` holds the signed gradient (``gps``/``net``/``layer``) or the weights
    (``magnitude``); absolute values are taken here.  Random schemes use the shapes only.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown selection scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    for n, f in frags.items():
        _, fan_in = rows_and_fan_in(n, f.shape)
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0 or k > fan_in:
            raise ValueError(f"k={k} is invalid for parameter {n!r} (fan_in={fan_in}): need 1 <= k <= fan_in")
    if scheme in ("gps", "magnitude"):
        return _gps_from_fragments(frags, k)
    if scheme == "layer":
        return _layer_from_fragments(frags, k)
    if scheme == "net":
        return _net_from_fragments(frags, k)
    meta = {n: torch.empty(f.shape, device="meta") for n, f in frags.items()}
    return select(scheme, None, meta, k, seed)


def gather_full(frags: Mapping[str, Fragment], dst: int = 0, absolute: bool = True) -> dict[str, torch.Tensor] | None:
    """Dense fp32 tensors from every rank's fragments, on rank ``dst`` (None elsewhere).

    This moves whole gradients: use it only for ``--save-scores`` and checks, never for selection.
    """
    rank, _ = _world()
    out = {}
    for n, f in frags.items():
        buf = torch.zeros(f.numel, dtype=torch.float32, device=_comm_device())
        if f.valid:
            v = f.valid_values().float()
            buf[f.start : f.start + f.valid] = v.abs() if absolute else v
        if _distributed():
            dist.reduce(buf, dst=dst)
        if rank == dst:
            out[n] = buf.cpu().view(f.shape)
    return out if rank == dst else None


# --------------------------------------------------------------------------- memory


def _tensors_in(obj, depth: int = 0, seen: set | None = None):
    seen = set() if seen is None else seen
    if depth > 4 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta":  # shape-only placeholders hold no memory
            yield obj
        if obj.grad is not None:
            yield obj.grad
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, depth + 1, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors_in(v, depth + 1, seen)
    elif hasattr(obj, "buffer") and hasattr(obj, "params"):  # DeepSpeed ipg bucket objects
        yield from _tensors_in(vars(obj), depth + 1, seen)


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except RuntimeError:
        return id(t), t.numel() * t.element_size()


def engine_memory_report(engine) -> dict[str, Any]:
    """Bytes held by the scoring engine's optimizer side, by attribute, beyond the model itself.

    Walks the ZeRO wrapper's attributes (and the inner torch optimizer's ``state``) and counts
    each tensor storage once; storages shared with the model's parameters (ZeRO flat buffers,
    ZeRO-3 ``ds_tensor``) are not counted.  Also returns the size of the candidates and of
    this rank's ``1/world`` share, and the inner optimizer's state entry count.
    """
    model = engine.module.model if isinstance(engine.module, ScoringModule) else engine.module
    model_keys = set()
    cand = set(getattr(engine, "gps_candidates", []))
    cand_numel = 0
    for n, p in model.named_parameters():
        for t in (p, getattr(p, "ds_tensor", None)):
            if t is not None and t.numel():
                model_keys.add(_storage_key(t)[0])
        if n in cand:
            cand_numel += math.prod(_shape(p))
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    by_attr: dict[str, int] = {}
    counted: set[int] = set()
    holders = [("optimizer_state", inner.state)]
    if opt is not inner:
        holders += [(k, v) for k, v in vars(opt).items() if k not in ("optimizer",)]
    for name, obj in holders:
        for t in _tensors_in(obj):
            key, nbytes = _storage_key(t)
            if key in model_keys or key in counted or nbytes == 0:
                continue
            counted.add(key)
            by_attr[name] = by_attr.get(name, 0) + nbytes
    # Gradients still attached to the model (stage 0/1 keep whole local grads in p.grad).
    grad_bytes = 0
    for p in model.parameters():
        if p.grad is not None:
            key, nbytes = _storage_key(p.grad)
            if key not in counted:
                counted.add(key)
                grad_bytes += nbytes
    _, world = _world()
    return {
        "stage": int(engine.zero_optimization_stage()),
        "world_size": world,
        "optimizer_state_entries": len(inner.state),
        "by_attribute": dict(sorted(by_attr.items(), key=lambda kv: -kv[1])),
        "wrapper_bytes": sum(by_attr.values()),
        "param_grad_bytes": grad_bytes,
        "candidate_numel": cand_numel,
        "candidate_fp32_share_bytes": 4 * math.ceil(cand_numel / world),
    }


# --------------------------------------------------------------------------- entry point


@dataclass
class ZeroScoreResult:
    """What :func:`score_and_select_zero` returns on every rank.

    Duck-compatible with :class:`gps_ds.selection.pipeline.SelectionResult` (``selection``,
    ``scores``, ``samples``, ``seconds``).  ``scores`` is None unless ``gather_scores`` (then
    the dense |Σg| on rank 0 only).
    """

    selection: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor] | None
    samples: int
    seconds: float
    batches: int = 0
    stage: int | None = None
    world_size: int = 1
    memory: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def score_and_select_zero(
    engine_or_model,
    batches: Iterable | None,
    loss_fn: ScoreLoss | None,
    candidates: list[str],
    k: int,
    *,
    scheme: str = "gps",
    ds_config: Mapping[str, Any] | None = None,
    seed: int = 0,
    max_batches: int | None = None,
    progress=None,
    micro_batch_size: int | None = None,
    precision: str = "fp32",
    gather_scores: bool = False,
    release: bool = True,
) -> ZeroScoreResult:
    """Score the candidates on this rank's batches under DeepSpeed and select; collective.

    ``engine_or_model``: a model (a scoring engine is built from ``ds_config``, the training
    DeepSpeed config, and released afterwards when ``release``) or an engine from
    :func:`build_scoring_engine` (left as it is).  ``batches`` yields this rank's
    ``(inputs, labels)`` (:func:`shard_batch` cuts a global batch).  Returns the same selection
    on every rank; ``gather_scores`` also returns the dense scores on rank 0 (this moves whole
    gradients; for ``--save-scores`` and checks only).  Every rank must call this.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown gps.scheme '{scheme}' (expected one of: {', '.join(SCHEMES)})")
    t0 = time.perf_counter()
    _, world = _world()
    timings: dict[str, float] = {}
    is_engine = hasattr(engine_or_model, "backward") and hasattr(engine_or_model, "module")
    model = (engine_or_model.module.model if is_engine and isinstance(engine_or_model.module, ScoringModule)
             else engine_or_model.module if is_engine else engine_or_model)
    params = _check_candidates(model, candidates)
    for n in candidates:
        _, fan_in = rows_and_fan_in(n, _shape(params[n]))
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0 or k > fan_in:
            raise ValueError(f"gps.k={k} is out of range for '{n}' (fan_in {fan_in}); use 1 <= k <= {fan_in}")
    if SCHEMES[scheme] != "scores":
        if gather_scores:
            raise ValueError(f"gps.scheme '{scheme}' computes no gradient scores")
        frags = weight_fragments(model, candidates) if scheme == "magnitude" else {
            n: Fragment(_shape(params[n]), 0, None) for n in candidates}
        sel = select_from_fragments(scheme, frags, k, seed)
        return ZeroScoreResult(sel, None, 0, time.perf_counter() - t0, world_size=world)
    if batches is None or loss_fn is None:
        raise ValueError(f"gps.scheme '{scheme}' needs training data and a scoring loss")
    engine = engine_or_model if is_engine else build_scoring_engine(
        model, loss_fn, candidates, ds_config, micro_batch_size=micro_batch_size, precision=precision)
    if not isinstance(engine.module, ScoringModule):
        raise TypeError("score_and_select_zero: pass a model or an engine from build_scoring_engine")
    if not hasattr(engine, "gps_candidates"):
        engine.gps_candidates = list(candidates)
    timings["setup"] = time.perf_counter() - t0
    try:
        stats = accumulate_zero(engine, batches, max_batches=max_batches, progress=progress)
        timings["pass"] = stats.seconds
        t1 = time.perf_counter()
        memory = engine_memory_report(engine)
        frags = grad_fragments(engine, candidates)
        sel = select_from_fragments(scheme, frags, k, seed)
        timings["select"] = time.perf_counter() - t1
        scores = gather_full(frags) if gather_scores else None
        stage = int(engine.zero_optimization_stage())
    finally:
        if release and not is_engine:
            release_scoring_engine(engine)
    return ZeroScoreResult(sel, scores, stats.samples, time.perf_counter() - t0, batches=stats.batches,
                           stage=stage, world_size=world, memory=memory, timings=timings)


def write_selection_rank0(path: str, result, model: nn.Module, candidates: Sequence[str], *, k: int, scheme: str,
                          loss: str, model_name: str) -> dict | None:
    """Write the mask file on rank 0 (shapes read ZeRO-3-aware), then barrier; summary on rank 0."""
    from gps_ds.selection.maskfile import param_fingerprint, save_mask, selection_stats

    rank, _ = _world()
    summary = None
    if rank == 0:
        shapes = {n: _shape(p) for n, p in model.named_parameters()}
        save_mask(path, result.selection, k=k, scheme=scheme, loss=loss, model=model_name, samples=result.samples,
                  fingerprint=param_fingerprint({n: shapes[n] for n in candidates}))
        stats = selection_stats(result.selection, shapes)
        summary = {"out": path, "selected": stats["total"], "tensors": len(result.selection), "k": k,
                   "scheme": scheme, "loss": loss, "samples": result.samples,
                   "seconds": round(result.seconds, 3), "world_size": getattr(result, "world_size", 1),
                   "zero_stage": getattr(result, "stage", None)}
    if _distributed():
        dist.barrier()
    return summary
