"""Masked mode under ZeRO / bf16: which DeepSpeed set-ups use the engine hook, which are refused
(single process, no DeepSpeed launch; the multi-rank checks are in test_zero_training_dist.py)."""

import pytest

from gps_ds.sparse.zero_hook import check_masked_supported, masked_needs_engine_hook
from gps_ds.tracking import Tracker


@pytest.mark.parametrize("cfg, hooked", [
    ({"zero_optimization": {"stage": 0}}, False),
    ({}, False),
    ({"zero_optimization": {"stage": 1}}, True),
    ({"zero_optimization": {"stage": 2}}, True),
    ({"zero_optimization": {"stage": 3}}, True),
    ({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, True),
])
def test_supported_setups(cfg, hooked):
    check_masked_supported(cfg)
    assert masked_needs_engine_hook(cfg) is hooked


@pytest.mark.parametrize("cfg, word", [
    ({"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}, "fp16"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, "optimizer"),
])
def test_refused_setups(cfg, word):
    with pytest.raises(ValueError, match=word):
        check_masked_supported(cfg)


def test_tracker_is_inactive_off_rank_zero(tmp_path):
    t = Tracker(enabled=True, rank=1, output_dir=tmp_path / "out", uri=f"sqlite:///{tmp_path / 'm.db'}")
    assert not t.active
    t.log_metrics({"x": 1.0}, step=0)
    t.end("FINISHED")
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "out").exists()
