"""`gps-ds delta merge` in bounded memory (issue #13, item 3): a .safetensors base is read and the
merged file written one tensor at a time (gps_ds.weights.merge_streaming)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from gps_ds.cli import run
from gps_ds.delta import Delta, DeltaError, merge_state_dict, save_delta
from gps_ds.weights import SafetensorsReader, WeightsError, merge_streaming

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"blocks.0.fc.weight": torch.randn(6, 5, generator=g), "blocks.0.fc.bias": torch.randn(6, generator=g),
            "conv.weight": torch.randn(4, 2, 3, 3, generator=g).to(torch.bfloat16), "scale": torch.tensor(3.0),
            "steps": torch.arange(5), "head.weight": torch.randn(3, 6, generator=g), "head.bias": torch.zeros(3)}


def _delta() -> Delta:
    g = torch.Generator().manual_seed(1)
    selected = {"blocks.0.fc.weight": (torch.tensor([[0, 3]] * 6, dtype=torch.int32), torch.randn(6, 2, generator=g)),
                "conv.weight": (torch.tensor([[1, 17], [0, -1], [5, 9], [2, 3]], dtype=torch.int32),
                                torch.randn(4, 2, generator=g))}
    whole = {"blocks.0.fc.bias": torch.randn(6, generator=g), "head.weight": torch.randn(10, 6, generator=g),
             "head.bias": torch.randn(10, generator=g)}
    return Delta(selected, whole, {"model": "toy", "method": "gps", "head": json.dumps(["head.weight", "head.bias"])})


def test_streaming_merge_equals_the_in_memory_merge(tmp_path):
    base, delta = _base(), _delta()
    save_file(base, str(tmp_path / "base.safetensors"))
    save_delta(tmp_path / "d.safetensors", delta)
    assert run(["delta", "merge", "--delta", str(tmp_path / "d.safetensors"), "--base", str(tmp_path / "base.safetensors"),
                "--out", str(tmp_path / "out.safetensors")]) == 0
    got = load_file(str(tmp_path / "out.safetensors"))
    want = merge_state_dict(base, _delta(), head=["head.weight", "head.bias"])  # the in-memory merge
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert got["head.weight"].shape == (10, 6) and got["conv.weight"].dtype == torch.bfloat16
    # Independent of merge_state_dict: the selected entries by hand.
    assert torch.equal(got["blocks.0.fc.weight"][:, [0, 3]], delta.selected["blocks.0.fc.weight"][1])
    assert got["conv.weight"].reshape(4, -1)[1, 0] == delta.selected["conv.weight"][1][1, 0].to(torch.bfloat16)
    assert torch.equal(got["conv.weight"].reshape(4, -1)[1, 1:], base["conv.weight"].reshape(4, -1)[1, 1:])


def test_streaming_merge_refuses_a_misfit_and_a_truncated_base(tmp_path):
    base = _base()
    save_file(base, str(tmp_path / "base.safetensors"))
    bad = Delta({"blocks.0.fc.weight": (torch.tensor([[9]] * 6, dtype=torch.int32), torch.zeros(6, 1))}, {})
    with pytest.raises(DeltaError, match="'blocks.0.fc.weight'"):
        merge_streaming(tmp_path / "base.safetensors", bad, [], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    raw = (tmp_path / "base.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-16])
    with pytest.raises(WeightsError, match="truncated"):
        merge_streaming(tmp_path / "cut.safetensors", _delta(), ["head.weight", "head.bias"], tmp_path / "o2.safetensors")
    assert not (tmp_path / "o2.safetensors").exists()
    with SafetensorsReader(tmp_path / "base.safetensors") as r:
        assert r.shape("conv.weight") == (4, 2, 3, 3) and r.dtype("conv.weight") == torch.bfloat16
        for name, t in base.items():  # row ranges, as the partitioned build reads them
            assert torch.equal(r.get(name), t), name
            if t.dim():
                for r0, r1 in ((0, 1), (1, t.shape[0]), (t.shape[0] - 1, t.shape[0] + 5), (2, 2)):
                    assert torch.equal(r.rows(name, r0, r1), t[r0:r1]), (name, r0, r1)


PEAK = """
import sys, torch
from gps_ds.delta import load_delta
from gps_ds.weights import load_state_dict, merge_streaming, save_state_dict
from gps_ds.delta import merge_state_dict
delta, base, out, how = sys.argv[1:]
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
d = load_delta(delta)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = rss()
if how == "stream":
    merge_streaming(base, d, [], out)
else:
    save_state_dict(merge_state_dict(load_state_dict(base), d), out)
print(hwm() - before)
"""


def test_streaming_merge_peak_memory_is_one_tensor_not_the_model(tmp_path):
    """A 192 MiB base of 48 tensors of 4 MiB: the streaming merge's peak RSS grows by about one
    tensor; the in-memory merge (measured side by side) by the whole model or more."""
    g = torch.Generator().manual_seed(0)
    base = {f"blocks.{i}.fc.weight": torch.randn(1024, 1024, generator=g) for i in range(48)}
    save_file(base, str(tmp_path / "base.safetensors"))
    del base
    sel = {f"blocks.{i}.fc.weight": (torch.zeros(1024, 1, dtype=torch.int32), torch.ones(1024, 1)) for i in range(48)}
    save_delta(tmp_path / "d.safetensors", Delta(sel, {}, {"model": "big"}))
    grown = {}
    for how in ("stream", "memory"):
        proc = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "d.safetensors"), str(tmp_path / "base.safetensors"),
                               str(tmp_path / f"{how}.safetensors"), how], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        grown[how] = int(proc.stdout.split()[-1]) / 1024  # MiB
    assert (tmp_path / "stream.safetensors").read_bytes() == (tmp_path / "memory.safetensors").read_bytes() or \
        all(torch.equal(a, b) for a, b in zip(load_file(str(tmp_path / "stream.safetensors")).values(),
                                              load_file(str(tmp_path / "memory.safetensors")).values()))
    assert grown["memory"] > 150, grown  # the control: the whole model was in memory
    assert grown["stream"] < 40, grown  # about 3 tensors of 4 MiB at a time
