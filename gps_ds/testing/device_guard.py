"""Device guard: CPU-only runs that fail where an accelerator run would mix up devices.

On a CPU machine the accelerator *is* the CPU, so a model left on the host, an input never moved
or a CPU tensor handed to an NCCL collective all run fine. The guard gives every tensor a logical
place instead:

* the accelerator is named ``cpu:0`` (DeepSpeed's CPU accelerator is told so, hence
  ``accelerator_device()``, the engine's placement and ZeRO's buffers use it); a tensor made or
  moved there is *on the device*, and reports ``t.device == cpu:0``;
* every other tensor is *on the host*: factory calls without a device or with ``"cpu"``,
  ``torch.tensor``/``from_numpy``, ``.cpu()``, loader output, parameters built before the move;
* an op's result is on the device when it was asked to be (``device=``) or when one of its
  tensor inputs is; ``.to(...)``/``.cpu()`` move (copying when the logical place changes),
  ``param.data = x``, ``nn.Parameter(x)`` and ``deepcopy`` carry the place along; an in-place
  op leaves its target where it was.

Three things are checked, each raising :class:`DeviceGuardError` naming the op or module and
the tensor: a module with parameters or buffers that runs on the host or gets a host input
(non-scalar); a collective of ``gps_ds`` (``gps_ds.distributed`` helpers, and any
``torch.distributed`` collective called from ``gps_ds`` code) given a host tensor; an op called
from ``gps_ds`` code that mixes host and accelerator tensors as CUDA refuses (a host operand that
is not a 0-dim scalar, a host operand of cat/stack, a host in-place target). Host tensors
elsewhere (``.item()``, masks and deltas written to files) are fine.

Use: ``with device_guard(): ...`` (tests; the pytest fixture in tests/conftest.py), or
``GPS_DS_DEVICE_GUARD=1`` for a ``gps-ds``/launcher process (checked once at start by the CLI).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

ENV = "GPS_DS_DEVICE_GUARD"
ACCELERATOR = torch.device("cpu", 0)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter")


class DeviceGuardError(AssertionError):
    """A device mix-up an accelerator run would hit (an AssertionError: no `except RuntimeError`
    fallback in the code swallows it)."""


# True: on the accelerator, False: on the host, absent: unknown (made outside the guard's view, e.g.
# by autograd or in a loader worker). Checks count unknown as host, except the mixed-op check.
_place: WeakIdKeyDictionary = WeakIdKeyDictionary()
violations: list[str] = []  # every error raised, also ones some caller swallowed


def on_device(t: torch.Tensor) -> bool:
    """Whether `t` is logically on the accelerator (False: on the host or unknown)."""
    return _place.get(t) is True


def _set(t: torch.Tensor, device: bool | None) -> None:
    if device is None:
        _place.pop(t, None)
    else:
        _place[t] = device


def _is_accelerator(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, int):  # a bare index means an accelerator ordinal
        return True
    d = torch.device(device)
    return d.type != "cpu" or d.index is not None


def _tensors(x: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif depth < 2 and isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v, depth + 1)
    elif depth < 2 and isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v, depth + 1)


def _describe(t: torch.Tensor) -> str:
    with torch._C.DisableTorchFunction():
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"


def _fail(message: str) -> None:
    violations.append(message)
    raise DeviceGuardError(f"device guard: {message}")


_DEVICE_GET = torch.Tensor.device.__get__
_DATA_SET = torch.Tensor.data.__set__
_TO, _CPU, _PIN = torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.pin_memory


class _ProvenanceMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == _DEVICE_GET:
            return ACCELERATOR if on_device(args[0]) else func(*args)
        if func == _DATA_SET:
            func(*args)
            _set(args[0], _place.get(args[1]))
            return None
        if func is _TO or func is _CPU or func is _PIN:
            return _move(func, args, kwargs)
        given = list(_tensors(args)) + list(_tensors(kwargs))  # before the call: it may fill a deepcopy memo
        inputs = {id(t) for t in given}
        places = [_place.get(t) for t in given]
        if kwargs.get("device") is not None:
            target = _is_accelerator(kwargs["device"])
        elif True in places:
            target = True
            if False in places:
                _check_mixed(func, args, given, places)
        else:  # a factory without a device makes a host tensor
            target = False if (not given or False in places) else None
        out = func(*args, **kwargs)
        for t in _tensors(out, 1):
            if id(t) not in inputs:  # in-place results keep their place
                _set(t, target)
        return out


def _move(func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
    src = args[0]
    if func is _TO:
        other = next((a for a in list(args[1:]) + [kwargs.get("other")] if isinstance(a, torch.Tensor)), None)
        if other is not None:
            target = _place.get(other)
        else:
            device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
            target = _place.get(src) if device is None else _is_accelerator(device)
    else:
        target = False
    out = func(*args, **kwargs)
    if out is src and target is not None and target != _place.get(src):
        out = src.clone()  # a move between host and accelerator is a copy on real hardware
    if out is not src:
        _set(out, target)
    return out


_MIX_ALLOWED = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_}  # cross-device on CUDA too
_CONCAT = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}


def _check_mixed(func: Callable, args: tuple, given: list, places: list) -> None:
    """An op of gps_ds code mixing host and accelerator tensors the way CUDA refuses: a host
    operand that is not a 0-dim scalar, any host operand of cat/stack, a host in-place target."""
    caller = sys._getframe(2).f_globals.get("__name__", "")
    if not caller.startswith("gps_ds.") or caller.startswith("gps_ds.testing") or func in _MIX_ALLOWED:
        return
    name = getattr(func, "__name__", str(func))
    inplace = name.endswith("_") or name.startswith("__i")
    for t, place in zip(given, places):
        if place is False and (t.dim() > 0 or name in _CONCAT or (inplace and args and t is args[0])):
            _fail(f"{name} (in {caller}) mixes a host {_describe(t)} with accelerator tensors (an accelerator "
                  f"run fails here: keep it on the device)")


def _module_check(module: nn.Module, inputs: tuple) -> None:
    if not module._parameters and not module._buffers:
        return
    with torch._C.DisableTorchFunction():
        for kind, store in (("parameter", module._parameters), ("buffer", module._buffers)):
            for name, p in store.items():
                if p is not None and not p.is_meta and not on_device(p):
                    _fail(f"{type(module).__name__} runs on the host: its {kind} '{name}' ({_describe(p)}) is on "
                          f"the CPU in an accelerator run (move the model to accelerator_device())")
        for i, t in enumerate(_tensors(inputs)):
            if t.dim() > 0 and not t.is_meta and not on_device(t):
                _fail(f"{type(module).__name__} got a host input (argument {i}: {_describe(t)}) while its "
                      f"parameters are on the accelerator (move inputs with task.to_device / .to(device))")


def check_collective(op: str, *tensors: Any) -> None:
    """Refuse host tensors in a collective (NCCL takes accelerator tensors only); a no-op when
    the guard is off. Called by gps_ds.distributed's helpers whatever the world size."""
    if not active():
        return
    for t in _tensors(tensors):
        if not on_device(t):
            _fail(f"{op}: a host (CPU) {_describe(t)} given to a collective of an accelerator run "
                  f"(NCCL refuses it; create it on accelerator_device())")


def _guarded_collective(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("gps_ds.") and not caller.startswith("gps_ds.testing"):
            check_collective(f"torch.distributed.{name} (from {caller})", args, kwargs)
        return fn(*args, **kwargs)

    wrapper.__wrapped_by_device_guard__ = fn
    return wrapper


_state: dict[str, Any] = {}


def active() -> bool:
    return bool(_state)


def enable() -> None:
    """Turn the guard on for this process (this thread's torch ops); idempotent."""
    if _state:
        return
    from deepspeed.accelerator import get_accelerator
    import torch.distributed as dist

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        raise DeviceGuardError(f"the device guard emulates an accelerator on CPU-only machines; this one has "
                               f"'{acc.device_name()}' (real hardware checks devices itself)")
    saved: dict[str, Any] = {"acc": acc, "acc_attrs": {k: acc.__dict__.get(k) for k in ("device_name", "current_device_name")}}
    acc.device_name = lambda device_index=None: str(ACCELERATOR)
    acc.current_device_name = lambda: str(ACCELERATOR)
    saved["param_new"] = nn.Parameter.__dict__["__new__"]
    original_new = nn.Parameter.__new__

    def parameter_new(cls, data=None, requires_grad=True):
        p = original_new(cls, data, requires_grad)
        if data is not None and data in _place:
            _place[p] = _place[data]
        return p

    nn.Parameter.__new__ = staticmethod(parameter_new)
    saved["collectives"] = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}
    for n, fn in saved["collectives"].items():
        setattr(dist, n, _guarded_collective(n, fn))
    saved["hook"] = nn.modules.module.register_module_forward_pre_hook(_module_check)
    saved["mode"] = _ProvenanceMode()
    saved["mode"].__enter__()
    _state.update(saved)


def disable() -> None:
    """Undo `enable` (the pytest fixture's teardown)."""
    if not _state:
        return
    import torch.distributed as dist

    _state["mode"].__exit__(None, None, None)
    _state["hook"].remove()
    for n, fn in _state["collectives"].items():
        setattr(dist, n, fn)
    nn.Parameter.__new__ = _state["param_new"]
    acc = _state["acc"]
    for k, v in _state["acc_attrs"].items():
        if v is None:
            acc.__dict__.pop(k, None)
        else:
            setattr(acc, k, v)
    _state.clear()


class Seen:
    """The violations recorded since a `device_guard` block began (raised or swallowed)."""

    def __init__(self) -> None:
        self._start = len(violations)

    def list(self) -> list[str]:
        return violations[self._start:]


@contextlib.contextmanager
def device_guard() -> Iterator[Seen]:
    """The guard inside the block (enabled unless it already was, then left on)."""
    was_on = active()
    enable()
    try:
        yield Seen()
    finally:
        if not was_on:
            disable()


def enable_from_env() -> None:
    """`GPS_DS_DEVICE_GUARD=1`: the guard for this whole process; a violation some caller
    swallowed still makes the process exit non-zero."""
    if os.environ.get(ENV, "") not in ("1", "true", "yes"):
        return
    enable()

    def report() -> None:
        if violations:
            print(f"device guard: {len(violations)} violation(s); first: {violations[0]}", file=sys.stderr, flush=True)
            os._exit(70)

    atexit.register(report)
