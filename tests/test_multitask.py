"""Many tasks on one backbone: switching in place gives exactly each task's merged model
(`gps-ds delta merge`), the base comes back bit for bit, shared counts equal a set computation,
deltas of another architecture / method are refused in one line, serve-tasks classifies files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gps_ds.cli import run
from gps_ds.config import validate_config
from gps_ds.delta import Delta, DeltaError, save_delta
from gps_ds.models import create_model, create_model_from_config
from gps_ds.multitask import TaskBank, load_bank
from gps_ds.rules import classify
from gps_ds.selection.pipeline import candidate_fingerprint
from gps_ds.weights import save_state_dict

CFG = {"model": {"name": "test_vit", "img_size": 32, "num_classes": 10},
       "data": {"recipe": "digits", "image_size": 32}, "train": {"seed": 3}, "tracking": {"enabled": False}}


def make_delta(model, roles, k, num_classes, seed, share_from=None, model_name="test_vit", method="gps"):
    """A GPS delta built directly: K random columns per row (half of them taken from `share_from`),
    random values, random biases and a fresh `num_classes` head."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    selected = {}
    for name in roles.candidates:
        w = params[name]
        rows, fan_in = w.shape[0], w[0].numel()
        idx = torch.stack([torch.randperm(fan_in, generator=g)[:k] for _ in range(rows)])
        if share_from is not None:  # the first K/2 columns of every row from the other task
            keep = share_from.selected[name][0][:, : k // 2].long()
            rows_idx = []
            for r in range(rows):
                chosen = keep[r].tolist()
                for c in torch.randperm(fan_in, generator=g).tolist():
                    if len(chosen) == k:
                        break
                    if c not in chosen:
                        chosen.append(c)
                rows_idx.append(chosen)
            idx = torch.tensor(rows_idx)
        idx = idx.sort(dim=1).values.to(torch.int32)
        selected[name] = (idx, torch.randn(idx.shape, generator=g))
    whole = {n: torch.randn(params[n].shape, generator=g) for n in roles.whole if n not in roles.head}
    dim = params["head.weight"].shape[1]
    whole["head.weight"] = torch.randn(num_classes, dim, generator=g)
    whole["head.bias"] = torch.randn(num_classes, generator=g)
    meta = {"model": model_name, "method": method, "k": k, "fingerprint": candidate_fingerprint(model, roles),
            "head": json.dumps(roles.head), "num_classes": num_classes, "method_options": "{}"}
    return Delta(selected, whole, meta)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multitask")
    cfg = validate_config(json.loads(json.dumps(CFG)))
    base = create_model_from_config(cfg)
    roles = classify(base)
    save_state_dict(base.state_dict(), tmp / "base.safetensors")
    a = make_delta(base, roles, 4, 5, seed=1)
    b = make_delta(base, roles, 4, 3, seed=2, share_from=a)
    save_delta(tmp / "a.safetensors", a)
    save_delta(tmp / "b.safetensors", b)
    merged = {}
    for name, nc in (("a", 5), ("b", 3)):
        assert run(["delta", "merge", "--delta", str(tmp / f"{name}.safetensors"), "--base", str(tmp / "base.safetensors"),
                    "--out", str(tmp / f"merged-{name}.safetensors")]) == 0
        from gps_ds.weights import load_state_dict

        m = create_model("test_vit", nc, img_size=32)
        m.load_state_dict(load_state_dict(str(tmp / f"merged-{name}.safetensors")), strict=True)
        merged[name] = m.eval()
    (tmp / "cfg.json").write_text(json.dumps(CFG))
    return tmp, cfg, a, b, merged


def test_switching_reproduces_each_merged_model_exactly(setup):
    tmp, cfg, _, _, merged = setup
    bank = load_bank(cfg, {"a": tmp / "a.safetensors", "b": tmp / "b.safetensors"})
    before = {n: t.clone() for n, t in bank.model.state_dict().items()}
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        for task in ("a", "b", "a", "b", "b", "a"):
            bank.activate(task)
            assert bank.model(x).shape[1] == (5 if task == "a" else 3)
            assert torch.equal(bank.model(x), merged[task](x)), task
            # every tensor of the switched model equals the merged checkpoint's
            mine = bank.model.state_dict()
            for n, t in merged[task].state_dict().items():
                assert torch.equal(mine[n], t), (task, n)
        bank.deactivate()
    for n, t in bank.model.state_dict().items():
        assert torch.equal(t, before[n]), n  # the base comes back bit for bit


def test_shared_counts_equal_a_set_computation(setup):
    tmp, cfg, a, b, _ = setup
    bank = load_bank(cfg, {"a": tmp / "a.safetensors", "b": tmp / "b.safetensors"})
    s = bank.shared()
    sets = [{(n, r, int(c)) for n, (idx, _) in d.selected.items() for r, row in enumerate(idx) for c in row}
            for d in (a, b)]
    assert s["selected_per_task"] == {"a": len(sets[0]), "b": len(sets[1])}
    assert s["selected_shared_by_all"] == len(sets[0] & sets[1]) > 0
    assert s["selected_union"] == len(sets[0] | sets[1])
    assert s["jaccard_all"] == pytest.approx(len(sets[0] & sets[1]) / len(sets[0] | sets[1]), abs=1e-6)
    whole = sum(t.numel() for n, t in a.whole.items() if not n.startswith("head"))
    assert s["entries_and_whole_per_task"]["a"] == len(sets[0]) + whole
    assert s["base_values_kept"] == len(sets[0] | sets[1]) + whole  # union of touched entries + biases


def test_refuses_other_architecture_method_and_model(setup):
    _, cfg, a, _, _ = setup
    base = create_model_from_config(cfg)
    bank = TaskBank(base, classify(base), "test_vit")
    other = create_model("test_vit", 10, img_size=32, kwargs={"depth": 2})
    foreign = make_delta(other, classify(other), 2, 4, seed=5)
    with pytest.raises(DeltaError, match="another architecture"):
        bank.add("x", foreign)
    renamed = Delta(a.selected, a.whole, {**a.meta, "model": "vit_small_patch16_224"})
    with pytest.raises(DeltaError, match="trained on model 'vit_small_patch16_224'"):
        bank.add("y", renamed)
    lora = Delta(a.selected, a.whole, {**a.meta, "method": "lora"})
    with pytest.raises(DeltaError, match="method 'lora'"):
        bank.add("z", lora)
    assert bank.tasks == {}


def _pngs(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_serve_tasks_cli_matches_merged_models(setup, capsys):
    tmp, cfg, _, _, merged = setup
    from gps_ds.data.transforms import build_batch_normalize, build_eval_transform

    imgs = _pngs(tmp, 3)
    rc = run(["serve-tasks", "--config", str(tmp / "cfg.json"), "--delta", f"a={tmp / 'a.safetensors'}",
              "--delta", f"b={tmp / 'b.safetensors'}", "--request", f"a={','.join(imgs)}",
              "--request", f"b={imgs[0]}", "--request", f"a={imgs[1]}", "--topk", "2", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    tf, norm = build_eval_transform(cfg.data, uint8=True), build_batch_normalize(cfg.data)
    for r in out["predictions"]:
        x = norm(tf(Image.open(r["image"]).convert("RGB")).unsqueeze(0))
        with torch.no_grad():
            p, c = merged[r["task"]](x).softmax(-1).topk(2, dim=1)
        assert r["classes"] == c[0].tolist()
        assert r["probs"] == pytest.approx(p[0].tolist(), abs=1e-6)
    assert [r["task"] for r in out["predictions"]] == ["a", "a", "a", "b", "a"]


def test_serve_tasks_user_errors_are_one_line(setup, capsys, tmp_path):
    tmp, *_ = setup
    other = create_model("test_vit", 10, img_size=32, kwargs={"depth": 2})
    save_delta(tmp_path / "foreign.safetensors", make_delta(other, classify(other), 1, 4, seed=6))
    cases = [
        ([f"a={tmp_path / 'foreign.safetensors'}"], "a", "another architecture"),
        ([f"a={tmp / 'a.safetensors'}"], "c", "unknown task 'c'"),
        ([f"a={tmp_path / 'missing.safetensors'}"], "a", "file not found"),
    ]
    for deltas, task, message in cases:
        args = ["serve-tasks", "--config", str(tmp / "cfg.json"), "--request", f"{task}={tmp / 'img0.png'}"]
        for d in deltas:
            args += ["--delta", d]
        assert run(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
