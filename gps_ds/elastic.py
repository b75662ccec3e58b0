"""Resuming at another world size (elastic resume) for runs whose trained state is small.

DeepSpeed's checkpoint holds each rank's ZeRO partition of the trained parameters and of the
optimizer state, so it only loads at the world size that wrote it. Every checkpoint of a ZeRO 1-3
run that trains no dense weight (not method `full`, not gps masked mode) therefore also holds
``trainable_full.safetensors`` (rank 0): the full fp32 master value of every trained parameter,
its full optimizer state tensors (Adam's ``exp_avg``/``exp_avg_sq``, SGD's ``momentum_buffer``)
and the optimizer's step counters, gathered one parameter at a time with DeepSpeed's
``safe_get_full_*`` API. In sparse mode that is the ``(rows, K)`` values, biases and the head.

A run resumed at M ranks from a checkpoint of N != M ranks rebuilds its model (and the frozen base
from the selection), sets every rank's partitions from that file (``safe_set_full_*`` for the fp32
masters and optimizer state, the rank's slice for the ZeRO-3 working copy) and continues. Only a
checkpoint taken at an epoch end is accepted at another world size, with the same global batch:
the training stream of an epoch is a function of the world size (readers = ranks x workers), so
the next epoch starts afresh at M ranks and no sample of a finished epoch is repeated or skipped.
The random states of the N ranks are not carried over (each rank keeps its state after set-up).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from gps_ds.checkpoint import CheckpointError, TrainState

ELASTIC_FILE = "trainable_full.safetensors"
ELASTIC_FORMAT = "gps-ds-elastic/1"


def elastic_reason(stage: int, method: str, mode: str) -> str | None:
    """Why this run's checkpoints cannot be resumed at another world size, or None."""
    if stage == 0:
        return "ZeRO stage 0 (use ZeRO 1-3)"
    if method == "full" or mode == "masked":
        return ("it trains dense weights (method full / gps masked mode); DeepSpeed's universal checkpoint "
                "conversion (ds_to_universal) is not wired in")
    return None


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _state_keys(engine) -> list[str]:
    keys: set[str] = set()
    for st in _inner_optimizer(engine).state.values():
        keys |= {k for k, v in st.items() if k != "step" and torch.is_tensor(v) and v.dim() > 0}
    return sorted(keys)


def _steps(engine) -> list[float]:
    out = []
    for st in _inner_optimizer(engine).state.values():
        s = st.get("step")
        if s is not None:
            out.append(float(s))
    return out


def _trained(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _relink_optimizer_state(engine) -> None:
    """ZeRO 1/2 map each parameter to its optimizer-state fragments once, right after the first
    step of the FIRST parameter group, when the other groups have no state yet; their fragments
    stay empty ("exp_avg not found in optimizer state fragment" on the first checkpoint of a run
    with a weight-decay and a no-decay group, DeepSpeed 0.19). Link again now that all exist."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def save_elastic(engine, path: Path, rank: int, meta: Mapping[str, Any]) -> None:
    """Write the full trained state (a collective: every rank calls it; rank 0 writes)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    _relink_optimizer_state(engine)
    keys = _state_keys(engine)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in _trained(engine.module):
        value = safe_get_full_fp32_param(p)
        states = {k: safe_get_full_optimizer_state(p, k) for k in keys}
        if rank == 0:
            tensors[f"param/{name}"] = value.detach().float().cpu().contiguous()
            for k, v in states.items():
                if v is not None:
                    tensors[f"{k}/{name}"] = v.detach().float().cpu().contiguous()
    if rank == 0:
        steps = sorted(set(_steps(engine)))
        info = {"format": ELASTIC_FORMAT, "steps": json.dumps(steps), "keys": json.dumps(keys), **{
            k: json.dumps(v) for k, v in meta.items()}}
        save_file(tensors, str(path), metadata=info)


def read_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - one line naming the file
        raise CheckpointError(f"{path}: unreadable elastic state ({str(e).splitlines()[0][:200]})") from None
    if meta.get("format") != ELASTIC_FORMAT:
        raise CheckpointError(f"{path}: not a {ELASTIC_FORMAT} file")
    return {k: json.loads(v) for k, v in meta.items() if k != "format"}


def check_elastic(folder: Path, state: TrainState, saved_world: int, world: int, reason: str | None,
                  global_batch: int) -> None:
    """Refuse, in one line, a resume at another world size that cannot be exact."""
    where = f"cannot resume from {folder}: world_size {saved_world} in the checkpoint, {world} now"
    if reason is not None:
        raise CheckpointError(f"{where}: {reason}; resume with {saved_world} ranks")
    path = folder / ELASTIC_FILE
    if not path.is_file():
        raise CheckpointError(f"{where}: it holds no {ELASTIC_FILE}; resume with {saved_world} ranks")
    if state.batch != 0:
        raise CheckpointError(f"{where}: it was taken at batch {state.batch} of epoch {state.epoch}, and an epoch's "
                              f"data stream depends on the world size; resume from an epoch-end checkpoint or "
                              f"with {saved_world} ranks")
    saved_batch = read_meta(path).get("global_batch")
    if saved_batch != global_batch:
        raise CheckpointError(f"{where}: the global batch was {saved_batch}, it is {global_batch} now; set "
                              f"deepspeed.train_micro_batch_size_per_gpu x gradient_accumulation_steps x ranks "
                              f"= {saved_batch}")


def load_elastic(engine, path: Path) -> None:
    """Set every rank's partitions of the trained parameters and optimizer state from `path`
    (a collective under ZeRO-3; every rank reads the file, which holds only trained tensors)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors.torch import load_file

    from gps_ds.zero_init import local_range

    meta = read_meta(path)
    try:
        saved = load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: unreadable elastic state ({str(e).splitlines()[0][:200]})") from None
    steps = meta.get("steps", [])
    if len(steps) > 1:
        raise CheckpointError(f"{path}: parameters at different optimizer steps {steps}")
    _ensure_state(engine, meta.get("keys", []), steps[0] if steps else 0.0)
    _relink_optimizer_state(engine)
    keys = _state_keys(engine)
    if sorted(meta.get("keys", [])) != keys:
        raise CheckpointError(f"{path}: optimizer state {meta.get('keys')} does not fit this run's optimizer ({keys})")
    for name, p in _trained(engine.module):
        value = saved.get(f"param/{name}")
        if value is None:
            raise CheckpointError(f"{path}: trained parameter '{name}' is missing")
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's slices of the fp32 master, the state and the working copy
            start, end = local_range(p)
            with torch.no_grad():
                p.ds_tensor.data[: end - start].copy_(value.reshape(-1)[start:end])
            for key in (None, *keys):
                _set_zero3_slice(engine.optimizer, p, value if key is None else saved[f"{key}/{name}"], key, start, end)
            continue
        safe_set_full_fp32_param(p, value.to(_device_of(p)))
        with torch.no_grad():
            p.data.copy_(value.reshape(p.shape))
        for k in keys:
            safe_set_full_optimizer_state(p, saved[f"{k}/{name}"].to(_device_of(p)), k)
    for st in _inner_optimizer(engine).state.values():
        if steps and "step" in st:
            old = st["step"]
            st["step"] = (torch.tensor(steps[0], dtype=old.dtype, device=old.device) if torch.is_tensor(old)
                          else type(old)(steps[0]))


def _set_zero3_slice(optimizer, p: nn.Parameter, full: torch.Tensor, key: str | None, start: int, end: int) -> None:
    # DeepSpeed 0.19's safe_set_full_* narrow the unpadded value by the padded partition size and
    # fail on the last rank when the partitions carry padding: the slice is written here instead.
    part, _ = optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    with torch.no_grad():
        part[: end - start].copy_(full.reshape(-1)[start:end])
        part[end - start:].zero_()


def _ensure_state(engine, keys: list[str], step: float) -> None:
    """A fresh engine's optimizer has no state yet (torch creates it at the first step): create the
    entries torch would (zeros, `step` a float32 tensor as torch.optim.Adam keeps it) so that the
    saved values can be set into them."""
    inner = _inner_optimizer(engine)
    # ZeRO-3 puts its fp32 flat partitions into the inner optimizer's groups only while stepping.
    flats = list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [])
    for q in flats or [q for group in inner.param_groups for q in group["params"]]:
        st = inner.state.get(q)
        if not st:
            inner.state[q] = {"step": torch.tensor(float(step), dtype=torch.float32),
                              **{k: torch.zeros_like(q, memory_format=torch.preserve_format) for k in keys}}


def _device_of(p: torch.Tensor) -> torch.device:
    t = getattr(p, "ds_tensor", None)
    return (t if t is not None else p).device
