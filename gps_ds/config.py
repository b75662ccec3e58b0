"""Typed run configuration: one JSON file, `--set dotted.key=value` overrides, one-line errors.

Sections: model, data, gps, train, deepspeed, tracking, output. The `deepspeed` section is a
DeepSpeed config passed through untouched; batch sizes and precision live there only.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gps_ds.data.config import DataConfig


class ConfigError(ValueError):
    """A user mistake in a config file or override; its message is one line fit to print."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "vit_base_patch16_224"
    num_classes: int | None = Field(None, ge=0, description="else data.num_classes or the shards' _info.json")
    pretrained: bool | str = False
    checkpoint: str | None = None
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    img_size: int | None = Field(None, gt=0)
    grad_checkpointing: bool = Field(False, description="activation checkpointing of the backbone's blocks")
    family: Literal["auto", "vit", "swin", "convnext", "sam", "generic"] = "auto"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    partitioned_init: Literal["auto", "on", "off"] = Field(
        "auto", description="ZeRO-3: build inside deepspeed.zero.Init and load each rank's slices of the weights file "
                            "(auto: when the method and the weights allow it; gps_ds/zero_init.py)")


class RuleOverrides(_Section):
    """fnmatch patterns on parameter names; checked in the order frozen, whole, candidate."""

    frozen: list[str] = Field(default_factory=list)
    whole: list[str] = Field(default_factory=list)
    candidate: list[str] = Field(default_factory=list)


SCHEMES = ("gps", "net", "layer", "random-net", "random-neuron", "magnitude")
LOSSES = ("supcon", "ce", "task")


class GPSConfig(_Section):
    k: int = Field(1, gt=0)
    scheme: Literal["gps", "net", "layer", "random-net", "random-neuron", "magnitude"] = "gps"
    loss: Literal["supcon", "ce", "task"] = "supcon"
    temperature: float = Field(0.07, gt=0.0)
    mode: Literal["sparse", "masked"] = "sparse"
    seed: int = 0
    max_batches: int | None = Field(None, gt=0)
    mask: str | None = None
    rules: RuleOverrides = Field(default_factory=RuleOverrides)

    @field_validator("mask")
    @classmethod
    def _mask_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"file not found: {v}")
        return v


class TrainConfig(_Section):
    method: str = Field("gps", description="a registered method (gps_ds.methods): gps, full, linear, bitfit, ...")
    method_options: dict[str, Any] = Field(default_factory=dict, description="options of the chosen method")
    epochs: int = Field(10, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none", description="peak lr = lr x (global batch / lr_base_batch) (linear) or its square root (sqrt); "
                            "global batch = micro batch x gradient accumulation x ranks; none: lr as given")
    lr_base_batch: int = Field(256, gt=0, description="the global batch at which train.lr is given (lr_scaling)")
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0)
    warmup_epochs: float = Field(0.0, ge=0.0)
    warmup_lr: float = Field(1e-7, ge=0.0)
    min_lr: float = Field(1e-8, ge=0.0)
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    seed: int = 0
    eval_every: int = Field(1, gt=0)
    log_every: int = Field(10, gt=0, description="fetch loss/lr, check finiteness and log every N optimizer steps")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from gps_ds.methods import method_names

        if v not in method_names():
            raise ValueError(f"unknown method '{v}' (expected one of: {', '.join(method_names())})")
        return v

    @model_validator(mode="after")
    def _method_options(self) -> "TrainConfig":
        from gps_ds.methods import get_method

        get_method(self.method, self.method_options)  # raises one line naming the option
        return self


class TaskConfig(_Section):
    """What the model is trained to do; `auto`: segmentation for SAM models or segmentation data."""

    name: Literal["auto", "classification", "segmentation"] = "auto"
    loss: Literal["bce_iou", "dice_bce"] = Field("bce_iou", description="segmentation: BCE + soft IoU (the "
                                                 "paper's) or Dice + BCE")
    prompt: Literal["none", "box"] = Field("none", description="segmentation: no prompt (the learned no-mask "
                                           "embedding, as in the paper) or ground-truth boxes")
    box_jitter: float = Field(0.1, ge=0.0, lt=1.0, description="training boxes: each side moved by up to this "
                                                              "share of the box side")
    seed: int = 0
    pictures: int = Field(4, ge=0, description="segmentation: PNG panels written for this many val/test images")


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = None
    experiment: str = "gps-ds"
    run_name: str | None = None


class OutputConfig(_Section):
    dir: str = "runs/default"
    overwrite: bool = False
    resume: bool = False
    checkpoints: bool = True  # DeepSpeed checkpoints under <dir>/checkpoints at every epoch end
    checkpoint_every_steps: int = Field(0, ge=0)  # also every N optimizer steps (0: epoch ends only)
    keep_checkpoints: int = Field(2, ge=1)


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    gps: GPSConfig = Field(default_factory=GPSConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value); value parsed as JSON, else kept as a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"--set {item!r}: config key '{where}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def _first_error_line(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"config key '{key}': {msg}{more}"


def validate_config(raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("config must be a JSON object with sections model, data, gps, ...")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_first_error_line(err)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path}: cannot read: {err}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read `path` (or start from the defaults when None), apply `--set` overrides, validate."""
    raw = read_config_file(path) if path is not None else {}
    prefix = f"{path}: " if path is not None else ""
    try:
        return validate_config(apply_overrides(raw, overrides or []))
    except ConfigError as err:
        if str(err).startswith("--set"):
            raise
        raise ConfigError(f"{prefix}{err}") from None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
