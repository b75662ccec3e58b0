"""ZeRO-3 models partitioned from construction: no rank ever holds the whole model.

Under ZeRO-3 (``model.partitioned_init``: ``auto`` when the weights come from a file) the trainer

1. builds the model inside ``deepspeed.zero.Init``: every layer is partitioned as soon as its
   constructor returns, so at most one layer exists whole at a time (and a meta-device twin gives
   the shapes that rules, fingerprints and counts need);
2. fills each rank's partitions from the weights file: a partition is a contiguous range of the
   flattened tensor, so a rank reads only the rows that cover it (plain reads of that byte range of
   a safetensors file, ``gps_ds.weights.SafetensorsReader``; a memory-mapped
   ``torch.load(weights_only=True)`` for .pth) — nothing is gathered;
   a tensor whose shape must be adapted (a resized position embedding) is read whole, alone;
3. scores on the partitioned model and applies sparse mode to it (``gps_ds.sparse``): each rank
   takes the selected entries of its own partition and one small all-reduce per layer gives
   every rank the ``(rows, K)`` values; the frozen base is never gathered.

Parameters the file lacks (a new classification head) keep their layer's own initialisation
(e.g. ``nn.Linear``'s), drawn on rank 0 and broadcast by ``zero.Init``: timm's post-construction
init pass runs on partitions and does nothing. They are trained and stored in the delta.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from gps_ds.models.factory import ModelError

# Methods whose `prepare` only sets requires_grad (or applies sparse mode): they run on a partitioned model.
PARTITIONED_METHODS = ("gps", "full", "linear", "decoder", "bitfit")


@dataclass
class LoadReport:
    """What this rank read and holds after a partitioned load (numbers of tensor entries)."""

    total: int = 0  # entries of every parameter of the model
    local: int = 0  # entries of this rank's partitions (padding included)
    read: int = 0  # entries read from the file by this rank
    largest_read: int = 0  # the largest single read
    fresh: tuple[str, ...] = ()  # parameters not in the file (their layer's own init)

    def line(self, rank: int, world: int) -> str:
        return (f"gps-ds: partitioned build, rank {rank}/{world}: holds {self.local} of {self.total} parameter "
                f"entries ({100.0 * self.local / max(self.total, 1):.1f}%), read {self.read} from the weights file "
                f"(largest read {self.largest_read}); {len(self.fresh)} parameters not in the file")


def zero_stage(ds_config: dict) -> int:
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0))


def weights_file(cfg) -> Path | None:
    """The file the model's weights come from: `model.checkpoint`, or timm's cached hub file."""
    m = cfg.model
    if m.checkpoint:
        return Path(m.checkpoint)
    if not m.pretrained or m.name.startswith("sam_"):
        return None
    import timm
    from huggingface_hub import try_to_load_from_cache

    name = m.name if not isinstance(m.pretrained, str) else f"{m.name}.{m.pretrained}"
    pcfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(pcfg, "hf_hub_id", None) if pcfg is not None else None
    if not hub_id:
        return None
    found = try_to_load_from_cache(hub_id, "model.safetensors")
    return Path(found) if isinstance(found, str) else None


def partitioned_wanted(cfg, ds_config: dict, *, scoring_only: bool = False) -> bool:
    """Whether the trainer builds this run's model partitioned (see the module docstring);
    `scoring_only` (`gps-ds select`): the training method and mode do not matter."""
    setting = cfg.model.partitioned_init
    if setting == "off":
        return False
    reason = None
    if zero_stage(ds_config) != 3:
        reason = "it needs deepspeed.zero_optimization.stage=3"
    elif not scoring_only and cfg.train.method not in PARTITIONED_METHODS:
        reason = f"train.method '{cfg.train.method}' wraps layers (supported: {', '.join(PARTITIONED_METHODS)})"
    elif not scoring_only and cfg.train.method == "gps" and cfg.gps.mode != "sparse":
        reason = "gps.mode 'masked' trains dense weights (use gps.mode=sparse)"
    elif weights_file(cfg) is None:
        reason = "the weights come from no file (set model.checkpoint; a partitioned random init could not be rebuilt)"
    elif (cfg.deepspeed.get("zero_optimization") or {}).get("offload_param", {}).get("device") == "nvme":
        reason = "parameters offloaded to NVMe are not resident to be filled"
    if reason is None:
        return True
    if setting == "on":
        raise ModelError(f"model.partitioned_init=on: {reason}")
    return False


def _rank_of(p: torch.Tensor) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group=p.ds_process_group)
    return 0


def local_range(p: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the flattened full tensor held in this rank's ZeRO-3 partition (no padding)."""
    pn = int(p.partition_numel())
    start = _rank_of(p) * pn
    return start, max(start, min(start + pn, int(p.ds_numel)))


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    s = getattr(p, "ds_shape", None)
    return tuple(int(d) for d in (s if s is not None else p.shape))


class TensorSource:
    """Named tensors of a weights file, read by row ranges (safetensors slices or an mmap'ed .pth)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._st = None
        self._state: dict[str, torch.Tensor] = {}
        try:
            if path.suffix == ".safetensors":
                from gps_ds.weights import SafetensorsReader

                # Plain reads of the byte ranges asked for: a memory map would add every page a rank
                # touches to its RSS.
                self._st = SafetensorsReader(path)
                self._keys = self._st.keys()
            else:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
                for key in ("state_dict", "model", "module"):
                    if isinstance(state, dict) and isinstance(state.get(key), dict):
                        state = state[key]
                if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                    raise ValueError("not a name -> tensor state dict")
                self._state = state
                self._keys = list(state)
        except Exception as err:  # noqa: BLE001 - any failure to parse is a bad file for the user
            raise ModelError(f"model.checkpoint {path} is unreadable or corrupt: "
                             f"{str(err).splitlines()[0][:200]}") from None

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return self._st.shape(key)
        return tuple(self._state[key].shape)

    def rows(self, key: str, r0: int, r1: int) -> torch.Tensor:
        if self._st is not None:
            return self._st.rows(key, r0, r1)
        return self._state[key][r0:r1].clone()

    def full(self, key: str) -> torch.Tensor:
        if self._st is not None:
            return self._st.get(key)
        return self._state[key].clone()


def _write_partition(p: nn.Parameter, read_rows: Callable[[int, int], torch.Tensor], report: LoadReport) -> None:
    """Fill this rank's partition of `p` from the rows of the full tensor that cover it."""
    shape = full_shape(p)
    if not is_partitioned(p):
        t = read_rows(0, shape[0] if shape else 1).reshape(shape)
        with torch.no_grad():
            p.data.copy_(t)
        report.read += t.numel()
        report.largest_read = max(report.largest_read, t.numel())
        return
    start, end = local_range(p)
    if end <= start:
        return
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    if not shape:  # a 0-d tensor: one "row"
        r0, r1, flat = 0, 1, read_rows(0, 1).reshape(-1)
    else:
        r0, r1 = start // row, -(-end // row)
        flat = read_rows(r0, r1).reshape(-1)
    off = start - r0 * row
    with torch.no_grad():
        p.ds_tensor.data[: end - start].copy_(flat[off: off + end - start])
    report.read += flat.numel()
    report.largest_read = max(report.largest_read, flat.numel())


def load_partitioned(model: nn.Module, twin: nn.Module, path: Path, *,
                     adapt: Callable[[str, torch.Tensor, tuple[int, ...]], torch.Tensor],
                     droppable: set[str]) -> LoadReport:
    """Fill `model`'s ZeRO-3 partitions (and its persistent buffers) from `path`, each rank reading
    only what it holds. `twin` is the same model on the meta device (names and shapes).
    `adapt(name, full, shape)` fits a tensor of another shape or raises ModelError; names in
    `droppable` may be absent from the file or be left out (a new head) and keep their init."""
    src = TensorSource(path)
    keys = set(src.keys())
    expected = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    missing = [k for k in expected if k not in keys and k not in droppable]
    unexpected = [k for k in src.keys() if k not in expected and k not in droppable]
    if missing or unexpected:
        first = f"'{missing[0]}' is missing" if missing else f"'{unexpected[0]}' is not a parameter of the model"
        raise ModelError(f"model.checkpoint {path} does not fit {model.__class__.__name__}: {first} "
                         f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    report = LoadReport()
    fresh = []
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for name, shape in expected.items():
        if name in params:
            report.total += math.prod(shape)
            if is_partitioned(params[name]):
                report.local += int(params[name].partition_numel())
        if name in droppable or name not in keys:
            fresh.append(name)
            continue
        if src.shape(name) != shape:
            whole = adapt(name, src.full(name), shape)
            report.read += whole.numel()
            report.largest_read = max(report.largest_read, whole.numel())
            read = (lambda w: lambda r0, r1: w.reshape(shape[0] if shape else 1, -1)[r0:r1])(whole)
        else:
            read = (lambda n: lambda r0, r1: src.rows(n, r0, r1) if shape else src.full(n))(name)
        if name in params:
            _write_partition(params[name], read, report)
        elif name in buffers:
            with torch.no_grad():
                buffers[name].copy_(read(0, shape[0] if shape else 1).reshape(shape))
    report.fresh = tuple(fresh)
    return report


def _timm_adapt(model_name: str, path: Path, twin: nn.Module):
    def adapt(name: str, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if name == "pos_embed" and value.dim() == 3 and len(shape) == 3 and value.shape[-1] == shape[-1]:
            from timm.layers import resample_abs_pos_embed

            prefix = 0 if getattr(twin, "no_embed_class", False) else getattr(twin, "num_prefix_tokens", 1)
            grid = tuple(twin.patch_embed.grid_size)
            return resample_abs_pos_embed(value.float(), new_size=grid, num_prefix_tokens=prefix).to(value.dtype)
        raise ModelError(f"model.checkpoint {path} does not fit {model_name}: '{name}' has shape "
                         f"{list(value.shape)}, the model {list(shape)}")
    return adapt


def _timm_droppable(twin: nn.Module, num_classes: int) -> set[str]:
    """timm drops the classifier of a pretrained file when the class count differs (load_pretrained)."""
    pcfg = getattr(twin, "pretrained_cfg", None) or {}
    classifiers = pcfg.get("classifier")
    if classifiers is None or num_classes == pcfg.get("num_classes"):
        return set()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    return {f"{c}.{leaf}" for c in classifiers for leaf in ("weight", "bias")}


def tagged_name(m) -> str:
    """`model.name` with its `model.pretrained` tag, as `create_model_from_config` builds it: the tag's
    pretrained_cfg gives the normalisation (resolve_data) and the classifier size (_timm_droppable)."""
    return f"{m.name}.{m.pretrained}" if isinstance(m.pretrained, str) and not m.name.startswith("sam_") else m.name


def build_partitioned(cfg, ds_config: dict, *, scoring: bool | None = None) -> tuple[nn.Module, nn.Module, LoadReport]:
    """(model partitioned under ZeRO-3 with the file's weights, its meta-device twin, this rank's report);
    `scoring`: whether a scoring pass follows (default: what the training config implies)."""
    from gps_ds.models.factory import create_model_from_config

    create_model_from_config(cfg, device="meta")  # settles model.num_classes from the data when unset
    m = cfg.model
    path = weights_file(cfg)
    if path is None or not path.is_file():
        raise ModelError(f"model.checkpoint: file not found: {path}")
    return build_partitioned_model(tagged_name(m), m.num_classes, path, ds_config, seed=cfg.train.seed,
                                   drop_path_rate=m.drop_path_rate, img_size=m.img_size, kwargs=m.kwargs,
                                   grad_checkpointing=m.grad_checkpointing,
                                   scoring=_will_score(cfg) if scoring is None else scoring)


def _will_score(cfg) -> bool:
    """Whether a scoring pass (a gradient partition next to every weight partition) follows the build."""
    from gps_ds.methods import get_method
    from gps_ds.selection.pipeline import needs_data

    return (cfg.gps.mask is None and needs_data(cfg.gps.scheme)
            and get_method(cfg.train.method, cfg.train.method_options).needs_selection)


def build_partitioned_model(name: str, num_classes: int, path: Path, ds_config: dict, *, seed: int = 0,
                            drop_path_rate: float = 0.0, img_size: int | None = None,
                            kwargs: dict | None = None, grad_checkpointing: bool = False, scoring: bool = False
                            ) -> tuple[nn.Module, nn.Module, LoadReport]:
    """`gps_ds.models.create_model(name, ...)` built inside deepspeed.zero.Init, its partitions filled
    from the weights file `path`; with its meta-device twin and this rank's load report."""
    import deepspeed

    from gps_ds.models.factory import create_model

    build = dict(drop_path_rate=drop_path_rate, img_size=img_size, kwargs=kwargs, grad_checkpointing=grad_checkpointing)
    twin = create_model(name, num_classes, device="meta", **build)
    from gps_ds.distributed import accelerator_device
    from gps_ds.memory_limits import check_parameters_fit

    world = dist.get_world_size() if dist.is_initialized() else 1
    half = any((ds_config.get(k) or {}).get("enabled", False) for k in ("bf16", "fp16"))  # zero.Init casts
    offload = ((ds_config.get("zero_optimization") or {}).get("offload_param") or {}).get("device", "none")
    device = accelerator_device()
    refusal = None
    try:
        check_parameters_fit(sum(p.numel() * (2 if half else p.element_size()) for p in twin.parameters()), world,
                             True, model=name, device=None if offload in ("cpu", "nvme") else device, scoring=scoring)
    except MemoryError as err:
        refusal = err
    if world > 1:  # every rank stops together (the others would wait in zero.Init's collectives)
        flag = torch.tensor([0 if refusal else 1], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if refusal is None and int(flag.item()) == 0:
            refusal = MemoryError(f"model.name '{name}': another rank's share of the parameters does not fit its memory")
    if refusal is not None:
        raise refusal
    torch.manual_seed(seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = create_model(name, num_classes, **build)
    if name.startswith("sam_"):
        from gps_ds.models.sam import _resize_or_refuse

        adapt, droppable = (lambda n, v, s: _resize_or_refuse(n, v, s, str(path))), set()
    else:
        adapt, droppable = _timm_adapt(name, path, twin), _timm_droppable(twin, num_classes)
    report = load_partitioned(model, twin, Path(path), adapt=adapt, droppable=droppable)
    return model, twin, report


def write_random_weights(name: str, num_classes: int, path: Path, *, img_size: int | None = None,
                         seed: int = 0) -> Path:
    """A weights file of model `name` with random values, written one tensor at a time (benchmarks:
    never the whole model in memory)."""
    from gps_ds.models.factory import create_model
    from gps_ds.weights import save_streaming

    twin = create_model(name, num_classes, device="meta", img_size=img_size)
    state = twin.state_dict()
    gen = torch.Generator().manual_seed(seed)
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}

    def produce(key: str) -> torch.Tensor:
        dtype, shape = specs[key]
        if not dtype.is_floating_point:
            return torch.zeros(shape, dtype=dtype)
        return (0.02 * torch.randn(shape, generator=gen)).to(dtype)

    save_streaming(path, specs, produce)
    return path


def print_report(report: LoadReport) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    print(report.line(rank, world), file=sys.stderr, flush=True)
