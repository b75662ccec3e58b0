"""`gps-ds select` end to end: deterministic mask files, scores, and one-line errors."""

import json

import pytest
import torch

from gps_ds.cli import run
from gps_ds.models import create_model
from gps_ds.rules import classify
from gps_ds.selection.maskfile import load_mask, load_scores


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    from gps_ds.data.datasets import write_digits

    root = tmp_path_factory.mktemp("sel")
    write_digits(root / "digits", test_size=0.25, seed=0, progress=False)
    cfg = {"model": {"name": "test_vit", "img_size": 32, "num_classes": 10},
           "data": {"train": str(root / "digits"), "test": str(root / "digits"), "recipe": "digits",
                    "image_size": 32, "workers": 0},
           "gps": {"k": 2, "max_batches": 2},
           "deepspeed": {"train_micro_batch_size_per_gpu": 16}}
    path = root / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


def test_same_seed_and_data_give_a_byte_identical_mask(cfg_path, tmp_path, capsys):
    a, b, scores = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "s.safetensors"
    assert run(["select", "--config", str(cfg_path), "--out", str(a), "--save-scores", str(scores), "--quiet"]) == 0
    assert run(["select", "--config", str(cfg_path), "--out", str(b), "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert a.read_bytes() == b.read_bytes()

    selection, meta = load_mask(a)
    model = create_model("test_vit", 10, img_size=32)
    roles = classify(model)
    params = dict(model.named_parameters())
    assert set(selection) == set(roles.candidates)
    assert meta["format"] == "gps-mask/1" and meta["k"] == 2 and meta["scheme"] == "gps" and meta["loss"] == "supcon"
    assert meta["samples"] == 32 and summary["samples"] == 32
    assert summary["selected"] == sum(2 * params[n].shape[0] for n in roles.candidates)
    # The mask is the per-row top-2 of the saved scores.
    s = load_scores(scores)
    for name, idx in selection.items():
        assert s[name].shape == params[name].shape
        rows = s[name].reshape(s[name].shape[0], -1)
        assert torch.equal(idx, torch.sort(torch.topk(rows, 2, dim=1).indices, dim=1).values)
        assert bool((idx[:, 1:] > idx[:, :1]).all())


def test_bad_input_is_one_line(cfg_path, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    cases = [
        (["--set", "gps.k=100000"], "gps.k=100000 is out of range for 'patch_embed.proj.weight'"),
        (["--set", "gps.scheme=random-neuron", "--save-scores", str(tmp_path / "s")], "computes no gradient scores"),
        (["--set", f"data.train={tmp_path}"], "has no _info.json"),
        (["--set", "gps.loss=ce", "--set", "model.name=nope_net"], "unknown model.name 'nope_net'"),
        (["--set", "model.checkpoint=/no/such.safetensors"], "model.checkpoint: file not found: /no/such.safetensors"),
    ]
    for extra, message in cases:
        assert run(["select", "--config", str(cfg_path), "--out", str(out), "--quiet", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], (extra, err[-1])
        assert not out.exists()
    garbage = tmp_path / "train-000000.tar"
    garbage.write_bytes(b"not a tar at all" * 100)
    assert run(["select", "--config", str(cfg_path), "--out", str(out), "--quiet", "--set", f"data.train={garbage}"]) == 2
    assert "no samples" in capsys.readouterr().err


def test_a_mask_for_another_model_is_refused(cfg_path, tmp_path, capsys):
    mask = tmp_path / "vit.safetensors"
    assert run(["select", "--config", str(cfg_path), "--out", str(mask), "--quiet", "--set", "gps.scheme=random-neuron"]) == 0
    code = run(["train", "--config", str(cfg_path), "--quiet", "--set", f"gps.mask={mask}",
                "--set", "model.name=test_convnext", "--set", "model.img_size=null",
                "--set", f"output.dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "blocks.0.attn.proj.weight" in err and "missing in the model" in err
