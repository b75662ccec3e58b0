"""train.lr_scaling: the peak learning rate follows the global batch (micro x accumulation x ranks)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gps_ds.config import ConfigError, validate_config
from gps_ds.optim import build_optimizer, build_scheduler, scaled_lr

REPO = Path(__file__).resolve().parents[1]


def _train(**kw):
    return validate_config({"train": kw}).train


def test_rule_by_hand():
    # linear: 1e-4 per 256 images -> 8 GPUs x 64 = 512: 2e-4; 64 GPUs x 64 = 4096: 1.6e-3
    assert scaled_lr(_train(lr=1e-4, lr_scaling="linear"), 512) == pytest.approx(2e-4, rel=1e-12)
    assert scaled_lr(_train(lr=1e-4, lr_scaling="linear"), 4096) == pytest.approx(1.6e-3, rel=1e-12)
    # sqrt: 4096 / 256 = 16 -> x4
    assert scaled_lr(_train(lr=1e-4, lr_scaling="sqrt"), 4096) == pytest.approx(4e-4, rel=1e-12)
    assert scaled_lr(_train(lr=3e-3, lr_scaling="linear", lr_base_batch=32), 32) == 3e-3  # at the base batch
    assert scaled_lr(_train(lr=3e-3), 4096) == 3e-3  # none (the default): as given, whatever the batch
    with pytest.raises(ValueError, match="lr_scaling=linear needs the global batch"):
        scaled_lr(_train(lr=1e-4, lr_scaling="linear"), None)
    with pytest.raises(ConfigError, match="train.lr_scaling"):
        validate_config({"train": {"lr_scaling": "cubic"}})
    with pytest.raises(ConfigError, match="train.lr_base_batch"):
        validate_config({"train": {"lr_base_batch": 0}})


def test_schedule_peaks_at_the_scaled_lr_and_warmup_ends_stay_absolute():
    cfg = _train(lr=1e-4, lr_scaling="linear", lr_base_batch=256, epochs=4, warmup_epochs=1, warmup_lr=1e-7,
                 min_lr=1e-8)
    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(model, cfg, global_batch=1024)
    sched = build_scheduler(opt, cfg, steps_per_epoch=10)
    lrs = []
    for step in range(40):
        sched.step_update(num_updates=step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-7)  # warm-up starts at warmup_lr, not scaled
    assert max(lrs) == pytest.approx(4e-4, rel=1e-9)  # 1e-4 x 1024 / 256, reached at the end of warm-up
    assert lrs[10] == pytest.approx(4e-4, rel=1e-9)
    assert min(lrs[10:]) >= 1e-8


def test_trainer_scales_by_micro_batch_times_accumulation_times_ranks(digits, tmp_path, capsys):
    """One rank, micro batch 16, 2 accumulation steps: global batch 32 = 4 x lr_base_batch 8."""
    from gps_ds.engine import Trainer

    cfg = validate_config({
        "model": {"name": "test_vit", "img_size": 32, "num_classes": 10},
        "data": {"train": str(digits), "test": str(digits), "recipe": "digits", "image_size": 32, "workers": 0,
                 "steps_per_epoch": 2},
        "train": {"method": "linear", "epochs": 1, "lr": 0.01, "lr_scaling": "linear", "lr_base_batch": 8},
        "deepspeed": {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 2},
        "tracking": {"enabled": False},
        "output": {"dir": str(tmp_path / "run")},
    })
    trainer = Trainer(cfg, show_progress=False)
    trainer.run()
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.04, rel=1e-12)
    assert "peak lr 0.04 = train.lr 0.01 scaled linear by global batch 32 / train.lr_base_batch 8" in \
        capsys.readouterr().err


def test_imagenet_recipe_states_and_uses_the_rule():
    raw = json.loads((REPO / "configs" / "imagenet.json").read_text())
    cfg = validate_config(raw)
    assert (cfg.train.lr_scaling, cfg.train.lr_base_batch) == ("linear", 256)
    # the documented example: 8 nodes x 8 GPUs at the config's micro batch
    micro = cfg.deepspeed["train_micro_batch_size_per_gpu"]
    assert scaled_lr(cfg.train, micro * 64) == pytest.approx(cfg.train.lr * micro * 64 / 256, rel=1e-12)
    expected = (REPO / "configs" / "EXPECTED.md").read_text()
    row = next(line for line in expected.splitlines() if line.startswith("| `configs/imagenet.json`"))
    assert "lr_scaling" in row and "256" in row, row
    assert re.search(r"lr = train\.lr x global batch / 256", expected), "the rule is stated in configs/EXPECTED.md"
    # epochs and schedule from the reference (100 epochs, 10 warm-up from 1e-7, min 1e-8, Adam, no decay)
    t = cfg.train
    assert (t.epochs, t.warmup_epochs, t.warmup_lr, t.min_lr, t.optimizer, t.weight_decay) == \
        (100, 10, 1e-7, 1e-8, "adam", 0.0)
    assert math.isclose(scaled_lr(t, 256), t.lr)
