"""`gps-ds analyze counts|blocks|overlap`: counts against a hand computation and the paper's
numbers, per-block and overlap results against hand-worked tiny masks and a set computation,
PNG + JSON outputs, MLflow artifacts, one-line user errors."""

import json
import random

import pytest
import torch

from gps_ds.analysis.blocks import compare_blocks
from gps_ds.analysis.counts import count_rows, table7_check
from gps_ds.analysis.overlap import compute_overlap
from gps_ds.cli import run
from gps_ds.selection.maskfile import save_mask


# -- counts ---------------------------------------------------------------------------------------
def test_counts_tiny_vit_by_hand():
    # test_vit: embed 64, depth 6, mlp hidden 192, patch conv (64, 3, 16, 16); per block the rows of
    # qkv (192), proj (64), fc1 (192), fc2 (64); biases: the same rows; head 64 x 7 + 7
    rows_per_model = 64 + 6 * (192 + 64 + 192 + 64)
    for r in count_rows("test_vit", [1, 3], num_classes=7):
        assert r["selected"] == r["k"] * rows_per_model
        assert r["whole"] - r["head"] == rows_per_model  # biases only (norms frozen, no layer scale)
        assert r["head"] == 64 * 7 + 7
        assert r["learnable"] == (r["k"] + 1) * rows_per_model


def test_counts_vit_base_reference_and_table7():
    r = count_rows("vit_base_patch16_224", [1], 100)[0]
    assert r["selected"] == 83_712 and r["biases"] == 83_712  # REFERENCE.md, "ViT-B/16 with K=1"
    rows = {t["row"]: t for t in table7_check()}
    for t in rows.values():
        assert t["match"] == (round(t["ours"] / 1e6, 2) == t["params_m"])
    # ViT-B/16 by hand: K=5 -> 5 x 83,712 + 83,712 biases + 768 x 100 + 100 head = 579,172
    assert rows["CIFAR-100"]["ours"] == 6 * 83_712 + 768 * 100 + 100 and rows["CIFAR-100"]["match"]
    assert rows["CIFAR-100 (ConvNeXt)"]["match"]


def test_counts_cli_outputs_and_mlflow(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("analysis", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    out = tmp_path / "counts"
    assert run(["analyze", "counts", "--models", "test_vit,test_convnext", "--k", "1,2,4", "--num-classes", "10",
                "--no-paper-check", "--out", str(out), "--json", "--mlflow-run", run_id, "--tracking-uri", uri]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads((out / "counts.json").read_text()) == result
    assert (out / "counts.png").stat().st_size > 1000
    assert [(r["model"], r["k"]) for r in result["rows"]] == [(m, k) for m in ("test_vit", "test_convnext")
                                                              for k in (1, 2, 4)]
    vit = [r for r in result["rows"] if r["model"] == "test_vit"]
    assert [r["selected"] for r in vit] == [k * (64 + 6 * 512) for k in (1, 2, 4)]  # linear in K
    logged = sorted(a.path for a in client.list_artifacts(run_id, "analysis"))
    assert logged == ["analysis/counts.json", "analysis/counts.png"]


def test_counts_cli_user_errors(tmp_path, capsys):
    assert run(["analyze", "counts", "--models", "no_such_model", "--k", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_model" in err[0]
    assert run(["analyze", "counts", "--models", "test_vit", "--no-paper-check", "--out", str(tmp_path),
                "--mlflow-run", "abc", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mlflow-run abc" in err[0]


# -- blocks -----------------------------------------------------------------------------------------
A = {"patch_embed.proj.weight": torch.tensor([[0], [5]]),
     "blocks.0.attn.qkv.weight": torch.tensor([[1, 2], [3, -1], [0, 4]]),
     "blocks.1.mlp.fc1.weight": torch.tensor([[7], [8]])}
B = {"blocks.1.mlp.fc1.weight": torch.tensor([[7, 9], [1, 8]]),
     "blocks.1.attn.proj.weight": torch.tensor([[0], [1], [2], [3]])}


def test_blocks_hand_worked():
    r = compare_blocks({"gps": A, "net": B})
    # A: patch_embed 2, blocks.0 5 (one -1 pad), blocks.1 2 -> 9; B: blocks.1 4 + 4 = 8
    assert r["totals"] == {"gps": 9, "net": 8}
    by = {row["block"]: row for row in r["blocks"]}
    assert list(by) == ["patch_embed", "blocks.0", "blocks.1"]
    assert [by[b]["gps"] for b in by] == [2, 5, 2] and [by[b]["net"] for b in by] == [0, 0, 8]
    assert by["blocks.0"]["gps_percent"] == pytest.approx(100 * 5 / 9, abs=1e-4)
    assert by["blocks.1"]["net_percent"] == 100.0


def _save(path, sel):
    save_mask(path, sel, k=2, scheme="gps", loss="supcon", model="m", samples=1, fingerprint="x")
    return path


def test_blocks_cli(tmp_path, capsys):
    a, b = _save(tmp_path / "a.safetensors", A), _save(tmp_path / "b.safetensors", B)
    out = tmp_path / "out"
    assert run(["analyze", "blocks", f"gps={a}", f"net={b}", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["totals"] == {"gps": 9, "net": 8}
    for f in ("blocks.json", "blocks.png", "blocks-gps.png", "blocks-net.png"):
        assert (out / f).stat().st_size > 0
    assert run(["analyze", "blocks", str(a), "--out", str(out)]) == 2
    assert "two selections" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    assert run(["analyze", "blocks", str(a), str(tmp_path / "bad.safetensors"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.safetensors" in err[0]


# -- overlap ----------------------------------------------------------------------------------------
def test_overlap_two_tasks_hand_worked():
    r = compute_overlap({"a": A, "b": B})
    # shared positions: fc1 (0,7) and (1,8) -> 2. A has 9, B has 8 -> union 15
    assert r["per_task"] == {"a": 9, "b": 8}
    assert r["regions"] == {"a": 7, "b": 6, "a+b": 2}
    assert r["union"] == 15 and r["shared_by_all"] == 2 and r["jaccard_all"] == pytest.approx(2 / 15, abs=1e-6)
    fc1 = next(p for p in r["per_parameter"] if p["parameter"] == "blocks.1.mlp.fc1.weight")
    assert fc1["per_task"] == {"a": 2, "b": 4} and fc1["shared_by_all"] == 2 and fc1["union"] == 4
    blocks = {b["block"]: b for b in r["per_block"]}
    assert blocks["blocks.1"]["jaccard_all"] == pytest.approx(2 / 8, abs=1e-6)  # A 2, B 8, shared 2
    assert blocks["blocks.0"]["jaccard_all"] == 0.0


def test_overlap_three_tasks_equals_sets():
    rng = random.Random(0)
    shapes = {"blocks.0.attn.qkv.weight": (12, 10), "blocks.1.mlp.fc2.weight": (6, 20), "head_like.weight": (3, 5)}
    sels = {}
    for t in "xyz":
        sels[t] = {n: torch.tensor([sorted(rng.sample(range(fan), 3)) for _ in range(rows)]) for n, (rows, fan)
                   in shapes.items()}
    r = compute_overlap(sels)
    sets = {t: {(n, i, int(c)) for n, idx in s.items() for i, row in enumerate(idx) for c in row}
            for t, s in sels.items()}
    x, y, z = sets["x"], sets["y"], sets["z"]
    assert r["regions"]["x"] == len(x - y - z) and r["regions"]["x+y"] == len((x & y) - z)
    assert r["regions"]["x+y+z"] == len(x & y & z) and r["regions"]["y+z"] == len((y & z) - x)
    assert r["union"] == len(x | y | z) and sum(r["regions"].values()) == r["union"]
    assert r["jaccard_pairs"]["x|z"] == pytest.approx(len(x & z) / len(x | z), abs=1e-6)


def test_overlap_cli(tmp_path, capsys):
    paths = [_save(tmp_path / f"{t}.safetensors", s) for t, s in (("a", A), ("b", B), ("c", A))]
    out = tmp_path / "ov"
    assert run(["analyze", "overlap", *map(str, paths), "--out", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["labels"] == ["a", "b", "c"] and r["regions"]["a+c"] == 7 and r["regions"]["a+b+c"] == 2
    assert (out / "overlap.png").stat().st_size > 1000
    assert run(["analyze", "overlap", str(paths[0]), "--out", str(out)]) == 2
    assert "at least two" in capsys.readouterr().err


def test_blocks_in_network_order():
    from gps_ds.analysis.common import block_of

    names = ["head.weight", "blocks.10.mlp.fc1.weight", "blocks.2.attn.qkv.weight", "patch_embed.proj.weight",
             "image_encoder.blocks.3.attn.qkv.weight", "image_encoder.patch_embed.proj.weight"]
    assert [block_of(n) for n in names] == ["head", "blocks.10", "blocks.2", "patch_embed",
                                            "image_encoder.blocks.3", "image_encoder.patch_embed"]
    sel = {n: torch.tensor([[0]]) for n in sorted(names)}  # files store tensors sorted by name
    r = compare_blocks({"a": sel, "b": sel})
    assert [b["block"] for b in r["blocks"]] == ["image_encoder.patch_embed", "patch_embed", "blocks.2", "blocks.10",
                                                 "image_encoder.blocks.3", "head"]
