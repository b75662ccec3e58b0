"""SAM polyp-style segmentation end to end on a small SAM (segment-anything's modeling classes,
64 px) and digits-seg shards (real MNIST digits on real photo crops): train, pick the best epoch
on validation, test once, pictures, `gps-ds eval`, delta merge into a plain SAM state dict."""

import copy
import json

import pytest
import torch

from gps_ds.cli import run
from gps_ds.config import validate_config
from gps_ds.delta import load_delta
from gps_ds.engine import Trainer
from gps_ds.evaluation import evaluate_task
from gps_ds.seeding import seed_everything
from gps_ds.tasks import build_task

SAM_SMALL = {"name": "sam_small", "img_size": 64, "kwargs": {"embed_dim": 32, "depth": 2, "prompt_dim": 32}}


@pytest.fixture(scope="module")
def seg_shards(tmp_path_factory):
    from gps_ds.data.datasets import write_digits_seg

    out = tmp_path_factory.mktemp("seg") / "digits-seg"
    write_digits_seg(out, size=160, val_size=32, test_size=32, seed=0, progress=False)
    return out


def seg_raw(shards, out, **sections):
    raw = {
        "model": dict(SAM_SMALL),
        "data": {"train": str(shards), "val": str(shards), "test": str(shards), "recipe": "segmentation",
                 "image_size": 64, "workers": 0, "hflip": 0.5},
        "gps": {"k": 1, "loss": "task", "max_batches": 4},
        "train": {"method": "gps", "epochs": 4, "lr": 3e-3, "optimizer": "adam", "min_lr": 1e-5},
        "task": {"pictures": 2},
        "deepspeed": {"train_micro_batch_size_per_gpu": 8},
        "tracking": {"enabled": False},
        "output": {"dir": str(out)},
    }
    for section, values in sections.items():
        raw[section].update(values)
    return raw


def untrained_val(cfg):
    """The val metrics of the model before any training (built and evaluated independently)."""
    from gps_ds.data.loaders import make_eval_loader
    from gps_ds.models import create_model_from_config

    seed_everything(cfg.train.seed)
    model = create_model_from_config(cfg)
    loader = make_eval_loader(cfg.data, 0, 1, batch_size_per_rank=8, split="val")
    return evaluate_task(model, loader, build_task(cfg), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def warm_sam(seg_shards, tmp_path_factory):
    """A small SAM briefly trained in full on the training split (a stand-in for SAM's pre-training:
    a random encoder gives the decoder nothing to segment with), as a plain SAM checkpoint."""
    from gps_ds.delta import merge_state_dict
    from gps_ds.models import create_model_from_config
    from gps_ds.weights import save_state_dict

    out = tmp_path_factory.mktemp("warm")
    cfg = validate_config(seg_raw(seg_shards, out / "run", data={"val": None}, train={"method": "full", "epochs": 8,
                                                                                     "lr": 1e-3},
                                  task={"pictures": 0}))
    Trainer(cfg, show_progress=False).run()
    seed_everything(cfg.train.seed)
    base = create_model_from_config(cfg).state_dict()
    path = out / "warm_sam.safetensors"
    save_state_dict(merge_state_dict(base, load_delta(out / "run" / "delta_last.safetensors")), path)
    return str(path)


@pytest.fixture(scope="module")
def gps_run(seg_shards, warm_sam, tmp_path_factory):
    out = tmp_path_factory.mktemp("sam") / "run"
    cfg = validate_config(seg_raw(seg_shards, out, model={"checkpoint": warm_sam}))
    trainer = Trainer(cfg, show_progress=False)
    return cfg, trainer, trainer.run()


def test_gps_on_sam_learns_and_selects_on_validation(gps_run):
    cfg, trainer, summary = gps_run
    assert summary["task"] == "segmentation" and summary["metric"] == "mdice" and summary["select_on"] == "val"
    before = untrained_val(cfg)  # the warm start, before this run's fine-tuning
    history = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    assert all("test_mdice" not in h for h in history)  # test is evaluated once, at the end
    assert summary["val"]["mdice"] > before["mdice"] + 0.1, (before, summary["val"])
    assert summary["val"]["eval_loss"] < before["eval_loss"]
    assert max(h["val_mdice"] for h in history) == pytest.approx(summary["val"]["mdice"])
    assert 0.0 <= summary["test"]["miou"] <= summary["test"]["mdice"] <= 1.0
    # GPS on SAM trains K=1 entries per encoder neuron + encoder biases + decoder + no-mask embedding.
    mask = load_delta(trainer.out / "delta_best.safetensors")
    assert all(n.startswith("image_encoder.") for n in mask.selected)
    assert "prompt_encoder.no_mask_embed.weight" in mask.whole
    assert any(n.startswith("mask_decoder.") for n in mask.whole)
    pictures = sorted(p.name for p in (trainer.out / "pictures").glob("*.png"))
    assert pictures == ["test_00.png", "test_01.png", "val_00.png", "val_01.png"]


def test_eval_cli_reproduces_the_test_metrics(gps_run, tmp_path, capsys):
    cfg, trainer, summary = gps_run
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    capsys.readouterr()
    assert run(["eval", "--config", str(cfg_path), "--delta", str(trainer.out / "delta_best.safetensors"),
                "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "segmentation" and result["count"] == 32
    assert result["mdice"] == pytest.approx(summary["test"]["mdice"], abs=1e-6)
    assert result["miou"] == pytest.approx(summary["test"]["miou"], abs=1e-6)


def test_merged_delta_is_a_plain_sam_state_dict(gps_run, tmp_path):
    """The merge loads strictly into segment-anything's own `Sam`, whose modules (called as upstream
    does, one image at a time) reproduce the trained model's logits."""
    import torch.nn.functional as F
    from segment_anything.modeling import Sam

    from gps_ds.models import create_model_from_config
    from gps_ds.weights import save_state_dict

    cfg, trainer, _ = gps_run
    seed_everything(cfg.train.seed)
    base = create_model_from_config(cfg)
    base_path, merged_path = tmp_path / "base.safetensors", tmp_path / "merged.safetensors"
    save_state_dict(base.state_dict(), base_path)
    assert run(["delta", "merge", "--delta", str(trainer.out / "delta_best.safetensors"), "--base", str(base_path),
                "--out", str(merged_path)]) == 0
    from safetensors.torch import load_file

    plain = Sam(copy.deepcopy(base.image_encoder), copy.deepcopy(base.prompt_encoder),
                copy.deepcopy(base.mask_decoder))
    plain.load_state_dict(load_file(str(merged_path)), strict=True)
    plain.eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    trained = copy.deepcopy(base)
    trained.load_state_dict(load_file(str(merged_path)), strict=True)
    with torch.no_grad():
        ours = trained.eval()(images)
        for i in range(2):
            emb = plain.image_encoder(images[i:i + 1])
            sparse, dense = plain.prompt_encoder(points=None, boxes=None, masks=None)
            low, _ = plain.mask_decoder(image_embeddings=emb, image_pe=plain.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=False)
            ref = F.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)
            torch.testing.assert_close(ours[i:i + 1], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["decoder", "bitfit", "full"])
def test_comparison_methods_train_on_sam(seg_shards, warm_sam, tmp_path, method):
    cfg = validate_config(seg_raw(seg_shards, tmp_path / "run", train={"method": method, "epochs": 1},
                                  model={"checkpoint": warm_sam},
                                  data={"steps_per_epoch": 3}, task={"pictures": 0}))
    summary = Trainer(cfg, show_progress=False).run()
    delta = load_delta(tmp_path / "run" / "delta_best.safetensors")
    assert not delta.selected
    if method == "decoder":
        assert set(delta.whole) and all(n.startswith("mask_decoder.") for n in delta.whole)
    elif method == "bitfit":
        assert all(n.startswith("mask_decoder.") or n.endswith("bias") for n in delta.whole)
        assert any(n.startswith("image_encoder.") for n in delta.whole)
    else:
        assert "image_encoder.pos_embed" in delta.whole
    assert summary["trainable"]["total"] == delta.num_whole()
    assert summary["val"]["mdice"] > 0.0


def test_segmentation_refuses_a_classification_scoring_loss(seg_shards, tmp_path, capsys):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(seg_raw(seg_shards, tmp_path / "run", gps={"loss": "supcon"})))
    assert run(["train", "--config", str(cfg_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gps.loss 'supcon'" in err[0] and "gps.loss='task'" in err[0]


def test_polyp_recipe_has_the_papers_settings():
    from gps_ds.config import load_config

    cfg = load_config("configs/polyp_sam.json")
    assert cfg.model.name == "sam_vit_b" and cfg.data.size == 1024 and cfg.model.grad_checkpointing
    assert cfg.deepspeed["train_micro_batch_size_per_gpu"] == 1
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.epochs, cfg.train.min_lr) == ("adam", 2e-4, 20, 1e-7)
    assert (cfg.gps.k, cfg.gps.loss, cfg.task.prompt, cfg.task.loss) == (1, "task", "none", "bce_iou")
    assert cfg.data.val_split == "val" and cfg.data.test_split == "test"
