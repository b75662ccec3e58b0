"""Resumable training checkpoints: a DeepSpeed checkpoint plus what DeepSpeed does not know.

Layout, under ``<output.dir>/checkpoints/``::

    latest                          the tag of the last complete checkpoint: written (temp file +
                                    os.replace) by rank 0 only after every rank has finished its files,
                                    so a save killed or out of disk space leaves the previous one
    step00000012/                   one tag per optimizer step
        mp_rank_00_model_states.pt  DeepSpeed: trainable parameters (frozen bases excluded) + buffers,
                                    so sparse mode's ``gps_indices`` travel with it
        *_optim_states.pt           DeepSpeed: each rank's optimizer partition
        gps_state.json              rank 0: position (epoch, batch, step), best/history, world size,
                                    method, mode, K and the sha256 of the selection
        rng_rank{r}.safetensors     every rank's python / numpy / torch random states
        ema.safetensors             the EMA weights (rank 0), when EMA is on

Resuming at the saved position is exact: the data stream of an epoch is a function of the seed,
the epoch and the rank, the skipped batches are read and dropped, and the random states are
restored after the skip. DeepSpeed's own files are read with ``weights_only=True``
(:class:`SafeTorchCheckpointEngine`).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "gps_state.json"
STATE_FORMAT = "gps-ds-checkpoint/1"


class CheckpointError(ValueError):
    pass


@dataclass
class TrainState:
    """Where a run stands: resume continues with batch ``batch`` of epoch ``epoch``."""

    epoch: int = 0
    batch: int = 0  # micro-batches of `epoch` already consumed
    step: int = 0  # optimizer steps so far
    best: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunIdentity:
    """What must match for a checkpoint to continue this run."""

    world_size: int
    method: str
    mode: str
    k: int
    selection_sha256: str
    fingerprint: str

    def mismatches(self, other: Mapping[str, Any]) -> list[str]:
        out = []
        for key, mine in asdict(self).items():
            theirs = other.get(key)
            if theirs != mine:
                out.append(f"{key} {theirs!r} in the checkpoint, {mine!r} now")
        return out


def selection_sha256(selection: Mapping[str, torch.Tensor] | None) -> str:
    """A digest of the selected indices (name order as given), "" without a selection."""
    if not selection:
        return ""
    h = hashlib.sha256()
    for name, idx in selection.items():
        t = idx.to(torch.int64).contiguous()
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_root(out: Path) -> Path:
    return Path(out) / CHECKPOINT_DIR


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` through a temporary file and ``os.replace``: a reader (or a disk running full)
    sees the old content or the new, never a part."""
    from gps_ds.selection.maskfile import _atomic_write

    _atomic_write(path, text.encode())


def latest_tag(out: Path) -> str | None:
    """The tag ``latest`` names, if it and its state file exist."""
    pointer = checkpoint_root(out) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not tag or "/" in tag or not (checkpoint_root(out) / tag / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer} names {tag!r}, which has no {STATE_FILE}: the checkpoint is incomplete")
    return tag


def read_state(out: Path, tag: str) -> tuple[TrainState, dict[str, Any]]:
    path = checkpoint_root(out) / tag / STATE_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint state ({e})") from None
    if raw.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a {STATE_FORMAT} file")
    try:
        s = raw["state"]
        return TrainState(s["epoch"], s["batch"], s["step"], s["best"], s["history"]), dict(raw["identity"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: malformed checkpoint state (missing {e})") from None


def check_identity(identity: RunIdentity, saved: Mapping[str, Any], where: Path) -> None:
    problems = identity.mismatches(saved)
    if problems:
        raise CheckpointError(f"cannot resume from {where}: " + "; ".join(problems)
                              + " (resume with the run's world size, method, mode, K and selection, or start a new run)")


# --------------------------------------------------------------------------- random states

def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    version, words, gauss = random.getstate()
    tensors["python"] = torch.tensor(words, dtype=torch.int64)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    meta = {"python": json.dumps([version, gauss]), "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)])}
    return tensors, meta


def save_rng(path: Path) -> None:
    from safetensors.torch import save_file

    tensors, meta = _rng_tensors()
    save_file(tensors, str(path), metadata=meta)


def load_rng(path: Path) -> None:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint was written by another number of ranks or is incomplete")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not {"torch", "python", "numpy"} <= tensors.keys() or not {"python", "numpy"} <= (meta or {}).keys():
            raise ValueError("random states missing")
    except Exception as e:  # safetensors raises its own error types; one line naming the file
        raise CheckpointError(f"{path}: unreadable random-state file ({_first_line(e)})") from None
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(int(v) for v in tensors["python"].tolist()), gauss))
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- DeepSpeed side

# Plain data classes DeepSpeed pickles into its optimizer-state files (ZeRO 1-3, fp16/bf16).
_DEEPSPEED_DATA_CLASSES = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def _safe_globals() -> list:
    """The non-tensor types allowed when reading DeepSpeed's files (besides plain containers)."""
    import importlib

    out = []
    for module, name in _DEEPSPEED_DATA_CLASSES:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return out


class _RecordingWriter(io.RawIOBase):
    """A binary file wrapper that keeps the OSError of a failed write."""

    def __init__(self, raw, name: str) -> None:
        super().__init__()
        self.raw, self.name, self.error = raw, name, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.raw.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.raw.flush()


def install_safe_loader(engine) -> None:
    """Make the engine read checkpoints with ``torch.load(weights_only=True)`` (no unpickling of code)
    and name the OSError of a failed write. Idempotent."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        return  # another engine (Nebula, decoupled, ...) configured by the user: leave it alone
    allowed = _safe_globals()

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str) -> None:
            # Through a Python file object: a failed write (disk full, file-size limit) is re-raised
            # as the OSError it was, not torch's "unexpected pos" from the zip writer.
            with open(path, "wb") as raw:
                writer = _RecordingWriter(raw, path)
                try:
                    torch.save(state_dict, writer, _use_new_zipfile_serialization=self.zipfile_serialization)
                except RuntimeError:
                    if writer.error is not None:
                        raise writer.error from None
                    raise

        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except FileNotFoundError:
                raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
            except Exception as e:  # truncated zip, pickled code refused, ...: name the file, one line
                raise CheckpointError(f"{path}: unreadable DeepSpeed checkpoint file ({_first_line(e)}); "
                                      f"resume from an earlier checkpoint or start a new run") from None

    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(engine.checkpoint_engine.__dict__)
    engine.checkpoint_engine = safe
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "checkpoint_engine"):
        optimizer.checkpoint_engine = safe


def save_checkpoint(engine, out: Path, state: TrainState, identity: RunIdentity, rank: int, *,
                    ema_module: torch.nn.Module | None = None, keep: int = 2,
                    elastic_meta: Mapping[str, Any] | None = None) -> str:
    """Write one checkpoint (a collective: every rank calls it); returns its tag. A failed write
    (disk full, ...) raises :class:`CheckpointError` naming the complete checkpoint that is kept."""
    from gps_ds import distributed as D

    root = checkpoint_root(out)
    tag = tag_for(state.step)
    folder = root / tag
    install_safe_loader(engine)
    if rank == 0:
        if folder.exists():  # a save of this step interrupted earlier: start it afresh
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    D.barrier()
    try:
        save_rng(folder / f"rng_rank{rank}.safetensors")
        if rank == 0:
            if ema_module is not None:
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous() for k, v in ema_module.state_dict().items()},
                          str(folder / "ema.safetensors"))
            payload = {"format": STATE_FORMAT, "state": asdict(state), "identity": asdict(identity)}
            atomic_write_text(folder / STATE_FILE, json.dumps(payload, indent=1))
        # DeepSpeed's own `latest` is written by rank 0 as soon as rank 0's files are done (another rank
        # may still be writing its optimizer partition) and in place (a full disk leaves it empty): the
        # pointer is written here instead, after a barrier, through a temporary file.
        engine.save_checkpoint(str(root), tag=tag, exclude_frozen_parameters=True, save_latest=False)
        if elastic_meta is not None:  # the world-size-independent copy of the trained state (gps_ds.elastic)
            from gps_ds.elastic import ELASTIC_FILE, save_elastic

            save_elastic(engine, folder / ELASTIC_FILE, rank, elastic_meta)
        D.barrier()
        if rank == 0:
            atomic_write_text(root / "latest", tag)
        D.barrier()
    except Exception as e:
        if D.is_peer_failure(e):
            raise  # the trainer names the lost rank and the checkpoint to resume from
        kept = latest_tag(out)
        raise CheckpointError(f"writing checkpoint {folder} failed ({_first_line(e)}); "
                              + (f"the last complete one, {root / kept}, is kept" if kept else
                                 "there is no earlier checkpoint")) from None
    if rank == 0:
        _prune(root, keep=keep, current=tag)
    return tag


def _prune(root: Path, *, keep: int, current: str) -> None:
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
    old = [t for t in tags if t != current][: max(0, len(tags) - keep)]
    for t in old:
        shutil.rmtree(root / t, ignore_errors=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0][:300] if text else type(err).__name__)


def load_checkpoint(engine, out: Path, tag: str, rank: int, *, ema_module: torch.nn.Module | None = None) -> None:
    """Restore weights and optimizer state (DeepSpeed) and the EMA; random states come later
    (:func:`restore_rng`), after the data stream was wound forward."""
    root = checkpoint_root(out)
    install_safe_loader(engine)
    path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=False, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {root / tag}")
    if ema_module is not None:
        from safetensors.torch import load_file

        ema_file = root / tag / "ema.safetensors"
        if not ema_file.is_file():
            raise CheckpointError(f"{ema_file} is missing but train.ema_decay is set")
        try:
            ema_module.load_state_dict(load_file(str(ema_file)))
        except Exception as e:
            raise CheckpointError(f"{ema_file}: unreadable EMA weights ({_first_line(e)})") from None


def restore_rng(out: Path, tag: str, rank: int) -> None:
    load_rng(checkpoint_root(out) / tag / f"rng_rank{rank}.safetensors")
