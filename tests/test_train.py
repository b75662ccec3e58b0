"""The trainer end to end on real data (scikit-learn digits as shards), one process."""

import json

import pytest
import torch

from gps_ds.cli import run
from gps_ds.config import validate_config
from gps_ds.delta import load_delta, merge_state_dict
from gps_ds.engine import Trainer
from gps_ds.seeding import seed_everything
from gps_ds.data.loaders import make_eval_loader
from gps_ds.data.transforms import resolve_data
from gps_ds.evaluation import TrainingError, evaluate
from gps_ds.models import create_model
from gps_ds.rules import classify
from gps_ds.weights import save_state_dict

MODEL = {"name": "test_vit", "img_size": 32, "num_classes": 10}
LR = {"gps": 3e-3, "linear": 3e-2, "bitfit": 3e-3, "full": 3e-4}


def make_cfg(digits, out, **overrides):
    raw = {
        "model": dict(MODEL),
        "data": {"train": str(digits), "test": str(digits), "recipe": "digits", "image_size": 32, "workers": 0,
                 "steps_per_epoch": 3},
        "gps": {"k": 1, "loss": "supcon", "max_batches": 2},
        "train": {"method": "gps", "epochs": 2, "lr": 0.01, "optimizer": "adamw", "weight_decay": 0.05},
        "deepspeed": {"train_micro_batch_size_per_gpu": 32},
        "output": {"dir": str(out)},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return validate_config(raw)


def initial_model(cfg):
    from gps_ds.models import create_model_from_config

    seed_everything(cfg.train.seed)
    return create_model_from_config(cfg)


@pytest.fixture(scope="module")
def warm_backbone(digits, tmp_path_factory):
    """A test_vit briefly trained in full on the digits: a random ViT's features barely depend on
    the input, so only the head could learn from it; methods are compared from this backbone."""
    out = tmp_path_factory.mktemp("warm")
    cfg = make_cfg(digits, out / "run", train__method="full", train__epochs=3, train__lr=1e-3,
                   train__optimizer="adam", train__weight_decay=0.0)
    cfg.data.steps_per_epoch = 4
    Trainer(cfg, show_progress=False).run()
    base = initial_model(cfg).state_dict()
    path = out / "warm.safetensors"
    save_state_dict(merge_state_dict(base, load_delta(out / "run" / "delta_last.safetensors")), path)
    return path


def a_batch(seed=0):
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def engine_weights(module) -> dict[str, torch.Tensor]:
    """The trained model's effective dense weights read from the engine's module: dense tensors
    as they are, sparse modules' frozen base with their values written in (read here, by hand)."""
    out = {n: p.detach().clone() for n, p in module.named_parameters() if not n.endswith("gps_values")}
    for name, mod in module.named_modules():
        if hasattr(mod, "gps_values"):
            w = mod.weight.detach().clone()
            flat = w.view(w.shape[0], -1)
            flat.scatter_(1, mod.gps_indices.long(), mod.gps_values.detach().to(w.dtype))
            out[f"{name}.weight"] = w
    return out


@pytest.mark.parametrize("method, mode", [("gps", "sparse"), ("gps", "masked"), ("linear", None), ("bitfit", None),
                                          ("full", None)])
def test_method_trains_only_its_parameters(digits, warm_backbone, tmp_path, method, mode):
    from gps_ds.selection.maskfile import load_mask

    extra = {"train__method": method, "train__epochs": 3, "train__lr": LR[method], "train__optimizer": "adam",
             "train__weight_decay": 0.0}
    if mode:
        extra["gps__mode"] = mode
    cfg = make_cfg(digits, tmp_path / "run", **extra)
    cfg.model.checkpoint = str(warm_backbone)
    trainer = Trainer(cfg, show_progress=False)
    summary = trainer.run()
    trained = trainer.engine.module.eval()
    init = initial_model(cfg)
    roles = classify(init)
    delta = load_delta(tmp_path / "run" / "delta_last.safetensors")

    # The merged dense model reproduces the trained (sparse or masked) model's predictions.
    dense = initial_model(cfg)
    dense.load_state_dict(merge_state_dict(init.state_dict(), delta))
    with torch.no_grad():
        torch.testing.assert_close(dense.eval()(a_batch()), trained(a_batch()), atol=2e-5, rtol=1e-5)

    # What moved is read from the engine's own weights, not from the delta.
    before = dict(init.named_parameters())
    after = engine_weights(trained)
    assert set(after) == set(before)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    if method == "linear":
        assert changed == set(roles.head)
    elif method == "bitfit":
        assert changed <= {n for n in before if n.endswith("bias")} | set(roles.head)
        assert any(n.endswith("bias") and n not in roles.head for n in changed)
    elif method == "full":
        assert {"blocks.0.norm1.weight", "pos_embed", "blocks.0.attn.qkv.weight"} <= changed
    else:
        # Only candidates, biases and the head move; a candidate changes only at the K entries per
        # row that the mask file (written before training) selected; every other entry is bit-identical.
        assert all(roles.roles[n] != "frozen" for n in changed)
        mask, _ = load_mask(tmp_path / "run" / "mask.safetensors")
        assert set(mask) == set(roles.candidates)
        moved_selected = total_selected = 0
        for name, idx in mask.items():
            moved = (before[name] != after[name]).reshape(before[name].shape[0], -1)
            allowed = torch.zeros_like(moved).scatter_(1, idx.long(), True)
            assert not (moved & ~allowed).any(), name
            moved_selected += int((moved & allowed).sum())
            total_selected += int(allowed.sum())
        assert moved_selected >= 0.9 * total_selected  # the selected entries did train
        if mode == "sparse":  # the frozen base tensors themselves: initial values except the selected slots
            for name, mod in trained.named_modules():
                if hasattr(mod, "gps_values"):
                    base, ref = mod.weight.detach(), before[f"{name}.weight"].detach()
                    keep = ~torch.zeros_like(base.view(base.shape[0], -1), dtype=torch.bool).scatter_(
                        1, mask[f"{name}.weight"].long(), True)
                    assert torch.equal(base.view(base.shape[0], -1)[keep], ref.view(ref.shape[0], -1)[keep]), name
        assert delta.num_selected() == sum(before[n].shape[0] for n in roles.candidates)
    assert summary["trainable"]["total"] == delta.num_selected() + delta.num_whole() or method == "full"
    # Training learned: test top-1 rose well above the warm starting model's (41% here).
    start_model = initial_model(cfg)  # evaluated with the data settings the trainer resolves from it
    start = evaluate(start_model, make_eval_loader(resolve_data(cfg.data, start_model), 0, 1, batch_size_per_rank=64),
                     "cpu", torch.float32).top1
    assert summary["test"]["top1"] >= start + 5.0, (start, summary["test"])


def test_mlflow_run_reads_back(digits, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = make_cfg(digits, tmp_path / "run", train__log_every=1)
    summary = Trainer(cfg, show_progress=False).run()
    client = MlflowClient(summary["tracking_uri"])
    mrun = client.get_run(summary["run_id"])
    assert mrun.info.status == "FINISHED"
    assert mrun.data.params["gps.k"] == "1" and mrun.data.params["train.method"] == "gps"
    assert mrun.data.params["deepspeed.train_micro_batch_size_per_gpu"] == "32"
    top1 = client.get_metric_history(summary["run_id"], "test_top1")
    assert len(top1) == 2
    assert sorted(top1, key=lambda m: m.step)[-1].value == pytest.approx(summary["test"]["top1"])
    assert len(client.get_metric_history(summary["run_id"], "train_loss")) == 6  # every step with log_every=1
    assert all(m.value > 0 for m in client.get_metric_history(summary["run_id"], "images_per_s"))
    assert client.get_metric_history(summary["run_id"], "data_corrupt_total")[-1].value == 0
    assert mrun.data.metrics["trainable_selected"] == summary["trainable"]["selected"]
    arts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"mask.safetensors", "delta_last.safetensors", "selection.png", "config.json"} <= arts


def test_best_epoch_is_chosen_on_validation_and_test_runs_once(digits, tmp_path, capsys):
    """With data.val the best epoch is picked on validation only; the test split is evaluated once,
    at the end, with the best delta, and `gps-ds eval` of that delta reproduces the number."""
    import gps_ds.engine as engine_mod

    cfg = make_cfg(digits, tmp_path / "run", train__method="linear", train__epochs=3)
    cfg.data.val, cfg.data.val_split = str(digits), "train"  # a stand-in validation split
    calls = []
    real = engine_mod.evaluate_task

    def spy(model, loader, task, device, dtype):
        calls.append(loader.dataset.__class__.__name__)
        return real(model, loader, task, device, dtype)

    engine_mod.evaluate_task = spy
    try:
        summary = Trainer(cfg, show_progress=False).run()
    finally:
        engine_mod.evaluate_task = real
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("test_top1" not in h for h in history) and len(history) == 3
    assert len(calls) == 4  # three validation passes, one test pass
    best = max(history, key=lambda h: h["val_top1"])
    assert summary["select_on"] == "val" and summary["best_epoch"] == best["epoch"]
    assert summary["val"]["top1"] == pytest.approx(best["val_top1"])
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    capsys.readouterr()
    assert run(["eval", "--config", str(cfg_path), "--delta", str(tmp_path / "run" / "delta_best.safetensors"),
                "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(summary["test"]["top1"]) and result["count"] == 450


def test_eval_cli_and_merge_cli(digits, tmp_path, capsys):
    cfg = make_cfg(digits, tmp_path / "run", train__epochs=1)
    summary = Trainer(cfg, show_progress=False).run()
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    delta_path = tmp_path / "run" / "delta_last.safetensors"
    capsys.readouterr()  # drop what training printed
    assert run(["eval", "--config", str(cfg_path), "--delta", str(delta_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(summary["test"]["top1"])
    assert result["count"] == 450  # every test sample exactly once

    base = tmp_path / "base.safetensors"
    save_state_dict(initial_model(cfg).state_dict(), base)
    merged = tmp_path / "merged.safetensors"
    assert run(["delta", "merge", "--delta", str(delta_path), "--base", str(base), "--out", str(merged)]) == 0
    capsys.readouterr()
    # A plain timm model loads the merged checkpoint strictly.
    from safetensors.torch import load_file

    plain = create_model("test_vit", 10, img_size=32)
    plain.load_state_dict(load_file(str(merged)))
    delta = load_delta(delta_path)
    assert torch.equal(plain.state_dict()["blocks.0.attn.qkv.bias"], delta.whole["blocks.0.attn.qkv.bias"])
    idx, values = delta.selected["blocks.0.attn.qkv.weight"]
    assert torch.equal(plain.blocks[0].attn.qkv.weight.detach().gather(1, idx.long()), values)
    assert run(["delta", "inspect", str(delta_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["selected"] == sum(p.shape[0] for n, p in plain.named_parameters() if n in classify(plain).candidates)


def test_output_folder_is_refused_then_overwritten(digits, tmp_path, capsys):
    cfg = make_cfg(digits, tmp_path / "run", train__method="linear", train__epochs=1)
    Trainer(cfg, show_progress=False).run()
    before = (tmp_path / "run" / "delta_last.safetensors").read_bytes()
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert run(["train", "--config", str(cfg_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert (tmp_path / "run" / "delta_last.safetensors").read_bytes() == before


def test_nan_loss_names_the_step_and_keeps_the_last_good_delta(digits, tmp_path, monkeypatch):
    import gps_ds.data.transforms as transforms

    real = transforms.build_train_criterion

    def poisoned(data_cfg):
        inner, calls = real(data_cfg), {"n": 0}

        def criterion(logits, target):
            calls["n"] += 1
            loss = inner(logits, target)
            return loss * float("nan") if calls["n"] > 4 else loss
        return criterion

    monkeypatch.setattr(transforms, "build_train_criterion", poisoned)
    cfg = make_cfg(digits, tmp_path / "run", train__method="linear")
    with pytest.raises(TrainingError, match=r"loss is nan at step 4 \(epoch 1\)"):
        Trainer(cfg, show_progress=False).run()
    assert load_delta(tmp_path / "run" / "delta_last.safetensors").whole  # epoch 0's delta is intact
