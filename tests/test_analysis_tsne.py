"""`gps-ds analyze tsne`: the features it projects are the head inputs of the base model and of
the merged fine-tuned model (captured independently with a forward hook), its scores equal
scikit-learn's on those features, PNG + JSON written, one-line errors."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import silhouette_score

from gps_ds.cli import run
from gps_ds.config import load_config
from gps_ds.data.loaders import make_eval_loader
from gps_ds.delta import load_delta, merge_state_dict, save_delta
from gps_ds.models import create_model, create_model_from_config
from gps_ds.rules import classify
from test_multitask import make_delta


def _head_inputs(model, loader, n):
    seen = []
    hook = model.head.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    labels = []
    with torch.no_grad():
        for batch in loader:
            model(batch[0][batch[2].bool()])
            labels.append(batch[1][batch[2].bool()])
    hook.remove()
    return torch.cat(seen)[:n].numpy(), torch.cat(labels)[:n].numpy()


def test_tsne_features_and_scores(digits, tmp_path, capsys):
    raw = {"model": {"name": "test_vit", "img_size": 32, "num_classes": 10},
           "data": {"test": str(digits), "recipe": "digits", "image_size": 32, "workers": 0},
           "deepspeed": {"train_micro_batch_size_per_gpu": 16}, "tracking": {"enabled": False}}
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    cfg = load_config(tmp_path / "cfg.json")
    base = create_model_from_config(cfg)
    delta = make_delta(base, classify(base), 2, 10, seed=4)
    save_delta(tmp_path / "d.safetensors", delta)
    out = tmp_path / "tsne"
    n = 40
    assert run(["analyze", "tsne", "--config", str(tmp_path / "cfg.json"), "--delta", str(tmp_path / "d.safetensors"),
                "--max-samples", str(n), "--perplexity", "10", "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["samples"] == n and len(r["labels"]) == n and r["feature_dim"] == 64
    merged = create_model("test_vit", 10, img_size=32)
    merged.load_state_dict(merge_state_dict(create_model_from_config(cfg).state_dict(), load_delta(
        tmp_path / "d.safetensors"), head=["head.weight", "head.bias"]))
    for key, model in (("before", create_model_from_config(cfg)), ("after", merged)):
        loader = make_eval_loader(cfg.data, 0, 1, batch_size_per_rank=16, split="test")
        feats, labels = _head_inputs(model.eval(), loader, n)
        assert r["labels"] == labels.tolist()
        assert r[key]["silhouette"] == pytest.approx(silhouette_score(feats, labels), abs=1e-4)
        assert np.asarray(r[key]["embedding"]).shape == (n, 2)
    assert r["before"]["silhouette"] != r["after"]["silhouette"]  # the delta changed the features
    assert (out / "tsne.png").stat().st_size > 1000 and (out / "tsne.json").is_file()


def test_tsne_refuses_a_delta_of_another_model(digits, tmp_path, capsys):
    raw = {"model": {"name": "test_vit", "img_size": 32, "num_classes": 10},
           "data": {"test": str(digits), "recipe": "digits", "image_size": 32, "workers": 0},
           "tracking": {"enabled": False}}
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    other = create_model("test_vit", 10, img_size=32, kwargs={"depth": 2})
    save_delta(tmp_path / "o.safetensors", make_delta(other, classify(other), 1, 10, seed=1))
    assert run(["analyze", "tsne", "--config", str(tmp_path / "cfg.json"), "--delta", str(tmp_path / "o.safetensors"),
                "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another architecture" in err[0]
