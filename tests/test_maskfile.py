"""Mask/score file I/O, fingerprints, fit checks and stats."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from gps_ds.selection import (
    MaskFileError,
    MaskMismatchError,
    check_fits,
    load_mask,
    load_scores,
    param_fingerprint,
    save_mask,
    save_scores,
    select,
    selection_stats,
)

META = dict(k=1, scheme="gps", loss="supcon", model="test_vit", samples=128, fingerprint="0123abcd")


def small_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 2), torch.nn.Flatten(), torch.nn.Linear(6, 5))


def small_selection():
    return {
        "0.weight": torch.tensor([[0], [11], [5], [5]]),  # conv fan_in 3*2*2 = 12
        "2.weight": torch.tensor([[1], [0], [5], [2], [3]]),
    }


def test_roundtrip_values_and_metadata(tmp_path):
    sel = small_selection()
    sel["x.weight"] = torch.tensor([[1, 4, -1], [0, -1, -1]])  # padded (net/layer style)
    sel["y.weight"] = torch.empty(3, 0, dtype=torch.long)  # nothing selected
    path = tmp_path / "mask.safetensors"
    save_mask(path, sel, **META)
    got, meta = load_mask(path)
    assert set(got) == set(sel)
    for n in sel:
        assert got[n].dtype == torch.int64 and torch.equal(got[n], sel[n])
    assert meta["format"] == "gps-mask/1"
    assert meta["k"] == 1 and meta["samples"] == 128
    assert (meta["scheme"], meta["loss"], meta["model"], meta["fingerprint"]) == (
        "gps", "supcon", "test_vit", "0123abcd")
    # the contract as seen by a plain safetensors reader: int32, same names/shapes
    raw = load_file(str(path))
    assert all(raw[n].dtype == torch.int32 and raw[n].shape == sel[n].shape for n in sel)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        m = f.metadata()
    assert m == {"format": "gps-mask/1", "k": "1", "scheme": "gps", "loss": "supcon",
                 "model": "test_vit", "samples": "128", "fingerprint": "0123abcd"}


def test_byte_identical_rewrites_and_insertion_order(tmp_path):
    sel = small_selection()
    a, b, c = tmp_path / "a.st", tmp_path / "b.st", tmp_path / "c.st"
    save_mask(a, sel, **META)
    save_mask(b, sel, **META)
    save_mask(c, dict(reversed(list(sel.items()))), **dict(reversed(list(META.items()))))
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()
    save_mask(a, sel, **META)  # overwrite in place
    assert a.read_bytes() == b.read_bytes()


def test_byte_identical_across_processes(tmp_path):
    # the safetensors library orders metadata differently per process; our writer must not
    code = textwrap.dedent(
        f"""
        import sys, torch
        from gps_ds.selection import save_mask
        sel = {{"0.weight": torch.tensor([[0], [11], [5], [5]]), "2.weight": torch.tensor([[1], [0], [5], [2], [3]])}}
        save_mask(sys.argv[1], sel, **{META!r})
        """
    )
    other = tmp_path / "other.st"
    subprocess.run([sys.executable, "-c", code, str(other)], check=True, cwd=os.getcwd())
    here = tmp_path / "here.st"
    save_mask(here, small_selection(), **META)
    assert here.read_bytes() == other.read_bytes()


def test_no_temp_files_left_and_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "mask.st"
    save_mask(path, small_selection(), **META)
    before = path.read_bytes()
    assert os.listdir(tmp_path) == ["mask.st"]

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_mask(path, {"w": torch.tensor([[0]])}, **META)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["mask.st"]


def test_save_rejects_bad_selection(tmp_path):
    with pytest.raises(ValueError, match="w"):
        save_mask(tmp_path / "m.st", {"w": torch.tensor([0, 1])}, **META)
    with pytest.raises(ValueError, match="integer"):
        save_mask(tmp_path / "m.st", {"w": torch.tensor([[0.5]])}, **META)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("cut", [0, 4, 9, 40, -1, -8])
def test_truncated_file_raises_mask_file_error(tmp_path, cut):
    good = tmp_path / "good.st"
    save_mask(good, small_selection(), **META)
    data = good.read_bytes()
    bad = tmp_path / "bad.st"
    bad.write_bytes(data[:cut] if cut >= 0 else data[: len(data) + cut])
    with pytest.raises(MaskFileError) as e:
        load_mask(bad)
    assert str(bad) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_garbage_missing_and_wrong_format(tmp_path):
    junk = tmp_path / "junk.st"
    junk.write_bytes(b"this is not a safetensors file at all" * 4)
    with pytest.raises(MaskFileError, match="junk.st"):
        load_mask(junk)
    with pytest.raises(MaskFileError, match="nope.st"):
        load_mask(tmp_path / "nope.st")
    with pytest.raises(MaskFileError, match="directory"):
        load_mask(tmp_path)
    other = tmp_path / "other.st"
    save_file({"w": torch.zeros(2, 1, dtype=torch.int32)}, str(other), metadata={"format": "pt"})
    with pytest.raises(MaskFileError, match="gps-mask/1"):
        load_mask(other)
    nometa = tmp_path / "nometa.st"
    save_file({"w": torch.zeros(2, 1, dtype=torch.int32)}, str(nometa))
    with pytest.raises(MaskFileError, match="nometa.st"):
        load_mask(nometa)
    scores = tmp_path / "scores.st"
    save_scores(scores, {"w": torch.zeros(2, 2)})
    with pytest.raises(MaskFileError, match="gps-mask/1"):
        load_mask(scores)
    wrong_dtype = tmp_path / "wd.st"
    save_file({"w": torch.zeros(2, 1)}, str(wrong_dtype),
              metadata={"format": "gps-mask/1", **{k: str(v) for k, v in META.items()}})
    with pytest.raises(MaskFileError, match="int32"):
        load_mask(wrong_dtype)


def test_scores_roundtrip(tmp_path):
    scores = {"a.weight": torch.rand(3, 4), "conv.weight": torch.rand(2, 3, 2, 2).double()}
    path = tmp_path / "scores.st"
    save_scores(path, scores)
    got = load_scores(path)
    assert got["a.weight"].dtype == torch.float32 and torch.equal(got["a.weight"], scores["a.weight"])
    assert got["conv.weight"].shape == (2, 3, 2, 2)
    assert torch.equal(got["conv.weight"], scores["conv.weight"].float())


# --------------------------------------------------------------------------- fingerprint / fits


def test_param_fingerprint():
    a = {"x.weight": (4, 3), "y.weight": (2, 3, 1, 1)}
    b = dict(reversed(list(a.items())))
    fp = param_fingerprint(a)
    assert fp == param_fingerprint(b)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp != param_fingerprint({"x.weight": (3, 4), "y.weight": (2, 3, 1, 1)})
    assert fp != param_fingerprint({"x.weight": (4, 3)})
    import hashlib

    want = hashlib.sha256(b"x.weight:4,3\ny.weight:2,3,1,1").hexdigest()[:16]
    assert fp == want


def test_check_fits_accepts_model_and_shapes():
    model = small_model()
    sel = small_selection()
    check_fits(sel, model)
    check_fits(sel, {"0.weight": (4, 3, 2, 2), "2.weight": (5, 6)})
    check_fits({"2.weight": torch.tensor([[5, -1]] * 5)}, model)  # -1 padding is fine


def test_check_fits_names_first_mismatch():
    model = small_model()
    sel = small_selection()
    bad_idx = dict(sel, **{"0.weight": torch.tensor([[0], [12], [5], [5]])})  # 12 >= fan_in 12
    with pytest.raises(MaskMismatchError) as e:
        check_fits(bad_idx, model)
    assert "0.weight" in str(e.value) and "12" in str(e.value)
    assert isinstance(e.value, ValueError)

    rows = {"2.weight": torch.zeros(4, 1, dtype=torch.long), "0.weight": sel["0.weight"]}
    with pytest.raises(MaskMismatchError, match=r"'2\.weight'.*5 rows"):
        check_fits(rows, model)

    missing = {"9.weight": torch.zeros(1, 1, dtype=torch.long), "2.weight": torch.zeros(4, 1, dtype=torch.long)}
    with pytest.raises(MaskMismatchError, match=r"'9\.weight'.*missing"):
        check_fits(missing, model)

    with pytest.raises(MaskMismatchError, match=r"'2\.bias'"):
        check_fits({"2.bias": torch.zeros(5, 1, dtype=torch.long)}, model)


def test_loaded_mask_fits_real_selection(tmp_path):
    model = small_model()
    scores = {n: p.detach().abs() for n, p in model.named_parameters() if p.dim() >= 2}
    for scheme in ("gps", "net", "layer", "random-net", "random-neuron", "magnitude"):
        sel = select(scheme, scores, scores, 2, seed=3)
        path = tmp_path / f"{scheme}.st"
        save_mask(path, sel, **dict(META, scheme=scheme, k=2))
        got, meta = load_mask(path)
        check_fits(got, model)
        assert meta["scheme"] == scheme
        assert all(torch.equal(got[n], sel[n]) for n in sel)


def test_selection_stats():
    sel = {
        "blocks.0.attn.qkv.weight": torch.tensor([[0, 1], [2, -1]]),
        "blocks.0.mlp.fc1.weight": torch.tensor([[3], [0], [1]]),
        "blocks.1.mlp.fc1.weight": torch.tensor([[1, -1], [-1, -1]]),
        "patch_embed.proj.weight": torch.tensor([[0]]),
    }
    shapes = {
        "blocks.0.attn.qkv.weight": (2, 4),
        "blocks.0.mlp.fc1.weight": (3, 4),
        "blocks.1.mlp.fc1.weight": (2, 4),
        "patch_embed.proj.weight": (1, 1, 2, 2),
    }
    st = selection_stats(sel, shapes)
    assert st["total"] == 3 + 3 + 1 + 1
    assert st["per_tensor"]["blocks.0.attn.qkv.weight"]["selected"] == 3
    assert st["per_tensor"]["blocks.1.mlp.fc1.weight"]["fraction"] == pytest.approx(1 / 8)
    assert st["per_block"] == {"blocks.0": 6, "blocks.1": 1, "patch_embed.proj": 1}
    assert st["candidate_numel"] == 8 + 12 + 8 + 4
    assert selection_stats(sel, None)["per_tensor"]["patch_embed.proj.weight"]["numel"] is None
