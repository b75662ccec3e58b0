import pytest
import torch
import torch.nn as nn

from gps_ds.delta import (Delta, DeltaError, extract_delta, gather_selected, load_delta, load_delta_into_model,
                          merge_state_dict, save_delta, scatter_selected)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Conv2d(5, 4, 3), nn.Flatten(), nn.Linear(4 * 4, 3))


def test_gather_scatter_hand_worked():
    w = torch.arange(12.0).reshape(3, 4)
    idx = torch.tensor([[0, 3], [1, -1], [2, 3]])
    assert gather_selected(w, idx).tolist() == [[0.0, 3.0], [5.0, 0.0], [10.0, 11.0]]
    out = scatter_selected(w, idx, torch.tensor([[-1.0, -2.0], [-3.0, 99.0], [-4.0, -5.0]]))
    assert out.tolist() == [[-1.0, 1, 2, -2], [4, -3, 6, 7], [8, 9, -4, -5]]
    conv = torch.arange(16.0).reshape(2, 2, 2, 2)  # rows flattened to in*kh*kw = 8
    assert gather_selected(conv, torch.tensor([[7], [0]])).tolist() == [[7.0], [8.0]]


def test_roundtrip_and_merge(tmp_path):
    model = _model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    selection = {"0.weight": torch.tensor([[0, 2]] * 5), "2.weight": torch.tensor([[1, 44]] * 4)}
    with torch.no_grad():  # "train": move selected entries, biases and the head
        for name, idx in selection.items():
            p = dict(model.named_parameters())[name]
            p.copy_(scatter_selected(p, idx, torch.randn(idx.shape)))
        model[0].bias.add_(1.0)
        model[4].weight.mul_(2.0)
    whole = ["0.bias", "2.bias", "4.weight", "4.bias"]
    delta = extract_delta(model, whole, selection, meta={"model": "toy"})
    save_delta(tmp_path / "d.safetensors", delta)
    loaded = load_delta(tmp_path / "d.safetensors")
    assert loaded.meta["format"] == "gps-delta/1" and loaded.meta["model"] == "toy"
    assert loaded.num_selected() == 5 * 2 + 4 * 2
    merged = merge_state_dict(base, loaded)
    for k, v in model.state_dict().items():
        assert torch.equal(merged[k], v), k
    fresh = _model()
    load_delta_into_model(fresh, loaded)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_misfits_are_refused(tmp_path):
    delta = Delta({"0.weight": (torch.tensor([[9]] * 5, dtype=torch.int32), torch.zeros(5, 1))}, {})
    with pytest.raises(DeltaError, match="'0.weight'.*fan_in 6"):
        load_delta_into_model(_model(), delta)
    with pytest.raises(DeltaError, match="'nope.bias' is not in the model"):
        load_delta_into_model(_model(), Delta({}, {"nope.bias": torch.zeros(3)}))
    with pytest.raises(DeltaError, match="'4.bias' has shape"):
        load_delta_into_model(_model(), Delta({}, {"4.bias": torch.zeros(7)}))
    # A different head is fine when merging into a base checkpoint (the task head replaces it).
    merged = merge_state_dict(_model().state_dict(), Delta({}, {"4.weight": torch.zeros(7, 16), "4.bias": torch.zeros(7)}),
                              head=["4.weight", "4.bias"])
    assert merged["4.weight"].shape == (7, 16)


def test_corrupt_and_foreign_files(tmp_path):
    p = tmp_path / "d.safetensors"
    save_delta(p, Delta({}, {"a": torch.ones(3)}))
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DeltaError, match="unreadable or truncated"):
        load_delta(p)
    from safetensors.torch import save_file
    save_file({"a": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(DeltaError, match="not a gps-ds delta file"):
        load_delta(tmp_path / "plain.safetensors")
    with pytest.raises(DeltaError, match="not found"):
        load_delta(tmp_path / "missing.safetensors")


def test_eval_refuses_a_delta_of_another_model(tmp_path, capsys):
    import json

    from gps_ds.cli import run

    save_delta(tmp_path / "d.safetensors", Delta({}, {"head.bias": torch.zeros(10)},
                                                 meta={"model": "convnext_tiny", "fingerprint": "0123456789abcdef"}))
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {"name": "test_vit", "num_classes": 10}}))
    assert run(["eval", "--config", str(cfg), "--delta", str(tmp_path / "d.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trained on model 'convnext_tiny'" in err and "test_vit" in err
