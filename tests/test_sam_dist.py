"""SAM segmentation on 2 CPU ranks: a ZeRO-2 training run that learns, and the ZeRO-3 per-shard
scoring pass (the task's own loss) selecting the same mask as one process."""

import json

import pytest
import torch

from dist_launch import ROOT, cli_args, launch
from test_sam_train import seg_raw, untrained_val, warm_sam  # noqa: F401  (warm_sam: a fixture)

from gps_ds.cli import run
from gps_ds.config import validate_config


def flat_sets(raw: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict) and v and k not in ("kwargs",):
            out.update(flat_sets(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.fixture(scope="module")
def seg_shards(tmp_path_factory):
    from gps_ds.data.datasets import write_digits_seg

    out = tmp_path_factory.mktemp("seg") / "digits-seg"
    write_digits_seg(out, size=160, val_size=32, test_size=32, seed=0, progress=False)
    return out


def test_zero2_two_ranks_learn(seg_shards, warm_sam, tmp_path):  # noqa: F811
    # 2 ranks x 4 = the single-process global batch of 8, so as many steps as the one-process run.
    raw = seg_raw(seg_shards, tmp_path / "run",
                  deepspeed={"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4},
                  task={"pictures": 1}, model={"checkpoint": warm_sam})
    launch(2, [str(ROOT / "launchers" / "train.py"), *cli_args(flat_sets(raw)), "--quiet"], tmp_path / "log.txt")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert json.loads((tmp_path / "run" / "run.json").read_text())["world_size"] == 2
    before = untrained_val(validate_config(raw))
    assert summary["val"]["mdice"] > before["mdice"] + 0.1, (before, summary["val"])
    assert summary["val"]["eval_loss"] < before["eval_loss"]
    assert summary["test"]["count"] == 32  # every test image once over the two ranks
    # The test pass ran with the best delta on both ranks: one process evaluating that delta agrees.
    from gps_ds.evaluation import evaluate_delta

    single = evaluate_delta(validate_config(raw), str(tmp_path / "run" / "delta_best.safetensors"))
    assert single["mdice"] == pytest.approx(summary["test"]["mdice"], abs=1e-6)
    assert (tmp_path / "run" / "pictures" / "test_00.png").is_file()


def test_zero3_scoring_equals_one_process(seg_shards, warm_sam, tmp_path, capsys):  # noqa: F811
    """Same samples, no augmentation: the 2-rank ZeRO-3 mask equals the single-process mask on every
    row except where the single-process scores tie at the K-th value (reduction order)."""
    from gps_ds.selection.maskfile import load_mask
    from safetensors.torch import load_file

    raw = seg_raw(seg_shards, tmp_path / "unused", data={"hflip": 0.0}, gps={"max_batches": None},
                  model={"checkpoint": warm_sam})
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(raw))
    single, scores = tmp_path / "single.safetensors", tmp_path / "scores.safetensors"
    assert run(["select", "--config", str(cfg_path), "--out", str(single), "--save-scores", str(scores),
                "--quiet"]) == 0
    capsys.readouterr()
    zero3 = tmp_path / "zero3.safetensors"
    launch(2, [str(ROOT / "launchers" / "select.py"), "--config", str(cfg_path), "--out", str(zero3), "--quiet",
               "--set", "deepspeed.zero_optimization.stage=3",
               "--set", "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"], tmp_path / "log.txt")
    a, meta_a = load_mask(single)
    b, meta_b = load_mask(zero3)
    assert int(meta_a["samples"]) == int(meta_b["samples"]) == 96
    s = load_file(str(scores))
    assert a.keys() == b.keys() and all(n.startswith("image_encoder.") for n in a)
    for name in a:
        differ = (a[name] != b[name]).any(1)
        for row in differ.nonzero().flatten().tolist():
            ranked = s[name].reshape(s[name].shape[0], -1)[row].double().sort(descending=True).values
            k = a[name].shape[1]
            assert torch.isclose(ranked[k - 1], ranked[k], rtol=1e-5), (name, row)
