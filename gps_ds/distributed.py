"""Process-group set-up for one process or many (deepspeed launcher, torchrun, Slurm)."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from gps_ds.testing.device_guard import check_collective

# A rank that dies makes the others fail in a collective after this long instead of hanging.
DEFAULT_TIMEOUT_S = int(os.environ.get("GPS_DS_COLLECTIVE_TIMEOUT", "600"))


_WORLD_OF_ONE = "GPS_DS_WORLD_OF_ONE_PORT"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_deepspeed_stdout() -> None:
    """DeepSpeed logs to stdout; move its handlers to stderr so `--json` output stays one object."""
    import logging
    import sys

    if "deepspeed" not in sys.modules:  # imported later under redirect_stdout, it picks stderr itself
        return
    from deepspeed.utils import logger

    for handler in logger.handlers:
        if type(handler) is logging.StreamHandler and handler.stream is not sys.stderr:
            handler.stream = sys.stderr  # not setStream(): that flushes a stream that may be closed


def init_distributed(timeout_s: int = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); return (rank, world).

    A plain `gps-ds train` gets a world of one on a free local port.
    """
    import deepspeed

    if not dist.is_initialized():
        # A world of one sets these variables for DeepSpeed in this process; a child process (a
        # test, `gps-ds bench trainer`) inherits them, and would take them for a launcher's and
        # bind the parent's port (EADDRINUSE). The marker tells the two cases apart.
        own = os.environ.get(_WORLD_OF_ONE)
        if own and os.environ.get("MASTER_PORT") == own and os.environ.get("WORLD_SIZE") == "1":
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
                os.environ.pop(key, None)
        if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
            port = os.environ.get("MASTER_PORT") or str(_free_port())
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT=port, **{_WORLD_OF_ONE: port})
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        from gps_ds.verbosity import quiet_prints

        with quiet_prints():  # DeepSpeed prints its op builds here; shown with gps-ds --verbose
            deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
        # Torn down before the interpreter's own teardown: a gloo process group left to static
        # destructors sometimes aborts the exit ("terminate called without an active exception").
        import atexit

        atexit.register(_destroy_process_group)
        if backend == "gloo":  # `deepspeed --num_gpus 1` creates a segment too
            release_shm_workspace()
    return dist.get_rank(), dist.get_world_size()


def accelerator_device() -> torch.device:
    """This rank's compute device as DeepSpeed's accelerator names it (cpu, cuda:N, ...)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shm_workspace_path(rank: int) -> Path:
    """This job's /dev/shm segment of DeepSpeed's CPU shared-memory allreduce for ``rank``
    (name as built in deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_workspace() -> None:
    """Unlink this rank's DeepSpeed shared-memory allreduce segment once every rank has mapped it.

    On CPU, when all ranks are on one machine, DeepSpeed creates one ~66 MiB /dev/shm segment per
    rank and never unlinks it: every multi-rank CPU run left them in RAM-backed tmpfs (18 GB on a
    test machine after two days, until runs were killed for memory). Each rank maps its peers'
    segments before deepspeed.init_distributed returns, so after a barrier the names can go; the
    mappings stay valid until the processes exit, however they exit.
    """
    barrier()
    try:
        shm_workspace_path(dist.get_rank()).unlink()
    except (FileNotFoundError, AttributeError):  # no shm allreduce (ranks on several machines)
        pass


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Exact sums across ranks (float64), e.g. (correct, count, loss_sum)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    check_collective("all_reduce_sum", t)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of a tensor that stays on its own device (NCCL refuses CPU tensors);
    a no-op in one process. Returns `t`."""
    check_collective("all_reduce_", t)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank iff `flag` is true on every rank (one small all-reduce)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    check_collective("all_true", t)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


_PEER_FAILURE_MARKERS = ("connection closed by peer", "connection reset by peer", "timed out", "timeout",
                         "broken pipe", "nccl communicator was aborted")


def is_peer_failure(err: BaseException) -> bool:
    """A collective failed because another rank died or stopped answering."""
    names = {c.__name__ for c in type(err).__mro__}
    if names & {"DistBackendError", "DistNetworkError"}:
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _PEER_FAILURE_MARKERS)
