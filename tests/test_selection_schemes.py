"""Selection schemes (GPS + Table 12 ablations) against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from gps_ds.selection import SCHEMES, gps_budget, select


def fan_in(shape) -> int:
    return math.prod(shape[1:])


def brute_row_topk(mat, k):
    out = []
    for row in mat.tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        out.append(sorted(order[:k]))
    return out


def as_entry_set(sel):
    """{(name, row, col)} of the selected entries, -1 padding dropped."""
    out = set()
    for name, idx in sel.items():
        for r, row in enumerate(idx.tolist()):
            for c in row:
                if c >= 0:
                    out.add((name, r, c))
    return out


def check_padded_layout(sel, shapes):
    for name, idx in sel.items():
        assert idx.dtype == torch.int64 and idx.dim() == 2 and idx.shape[0] == shapes[name][0]
        for row in idx.tolist():
            valid = [c for c in row if c >= 0]
            assert row == valid + [-1] * (len(row) - len(valid)), row  # padding only at the end
            assert valid == sorted(set(valid))
            assert all(c < fan_in(shapes[name]) for c in valid)
        if idx.shape[1]:
            assert (idx >= 0).sum(1).max() == idx.shape[1]  # width is the max count per row


def make_scores(seed=0, levels=3):
    g = torch.Generator().manual_seed(seed)
    shapes = {"blocks.0.qkv.weight": (6, 5), "patch.proj.weight": (4, 2, 2, 2), "blocks.1.fc.weight": (3, 9)}
    scores = {n: torch.randint(0, levels, s, generator=g).float() for n, s in shapes.items()}
    return shapes, scores


# --------------------------------------------------------------------------- gps / magnitude


def test_gps_matches_bruteforce_conv_and_linear():
    shapes, scores = make_scores()
    for k in (1, 2, 5):
        sel = select("gps", scores, None, k, 0)
        assert list(sel) == list(shapes)
        for n, s in scores.items():
            assert sel[n].tolist() == brute_row_topk(s.reshape(s.shape[0], -1), k)


def test_magnitude_matches_bruteforce_abs():
    g = torch.Generator().manual_seed(5)
    weights = {
        "a.weight": torch.randint(-3, 4, (5, 7), generator=g).float(),
        "conv.weight": torch.randn(4, 3, 2, 2, generator=g),
    }
    sel = select("magnitude", None, weights, 3, 0)
    for n, w in weights.items():
        assert sel[n].tolist() == brute_row_topk(w.reshape(w.shape[0], -1).abs(), 3)
    # scores given too: candidate set from scores, values from |W|
    scores = {n: torch.zeros_like(w) for n, w in weights.items()}
    assert all(torch.equal(select("magnitude", scores, weights, 3, 0)[n], sel[n]) for n in sel)


def test_magnitude_hand_worked():
    w = {"w": torch.tensor([[-5.0, 1.0, 5.0, -0.5], [0.0, -2.0, 2.0, 1.0]])}
    assert select("magnitude", None, w, 1, 0)["w"].tolist() == [[0], [1]]
    assert select("magnitude", None, w, 2, 0)["w"].tolist() == [[0, 2], [1, 2]]


# --------------------------------------------------------------------------- net / layer


def test_net_and_layer_hand_worked():
    scores = {
        "a": torch.tensor([[3.0, 3.0], [0.0, 1.0]]),
        "b": torch.tensor([[3.0, 2.0, 2.0]]),
    }
    # budget = 2*1 + 1*1 = 3; global order: a[0,0], a[0,1], b[0,0] (all 3, by tensor then index)
    net = select("net", scores, None, 1, 0)
    assert net["a"].tolist() == [[0, 1], [-1, -1]]
    assert net["b"].tolist() == [[0]]
    # layer: a gets its top-2 (a[0,0], a[0,1]), b its top-1
    layer = select("layer", scores, None, 1, 0)
    assert layer["a"].tolist() == [[0, 1], [-1, -1]]
    assert layer["b"].tolist() == [[0]]
    scores["b"] = torch.tensor([[4.0, 2.0, 2.0]])
    scores["a"] = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    net = select("net", scores, None, 1, 0)  # 4 (b0), then the 2s: a[1,0], a[1,1] before b's
    assert net["a"].tolist() == [[-1, -1], [0, 1]] and net["b"].tolist() == [[0]]
    layer = select("layer", scores, None, 1, 0)  # b's budget 1: the 4
    assert layer["a"].tolist() == [[-1, -1], [0, 1]] and layer["b"].tolist() == [[0]]


def test_net_matches_bruteforce_global_sort():
    shapes, scores = make_scores(seed=2, levels=4)
    for k in (1, 2, 4):
        sel = select("net", scores, None, k, 0)
        check_padded_layout(sel, shapes)
        entries = []
        for t, (n, s) in enumerate(scores.items()):
            for i, v in enumerate(s.reshape(-1).tolist()):
                entries.append((-v, t, i, n))
        entries.sort()
        budget = gps_budget(shapes, k)
        want = {(n, i // fan_in(shapes[n]), i % fan_in(shapes[n])) for _, _, i, n in entries[:budget]}
        assert as_entry_set(sel) == want


def test_layer_matches_bruteforce_per_tensor():
    shapes, scores = make_scores(seed=4, levels=3)
    k = 2
    sel = select("layer", scores, None, k, 0)
    check_padded_layout(sel, shapes)
    for n, s in scores.items():
        flat = s.reshape(-1).tolist()
        order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[: shapes[n][0] * k]
        want = {(n, i // fan_in(shapes[n]), i % fan_in(shapes[n])) for i in order}
        assert {e for e in as_entry_set(sel) if e[0] == n} == want


@pytest.mark.parametrize("scheme", ["gps", "net", "layer", "random-net", "random-neuron", "magnitude"])
@pytest.mark.parametrize("k", [1, 3])
def test_budgets_equal_gps_budget(scheme, k):
    shapes, scores = make_scores(seed=k, levels=2)
    sel = select(scheme, scores, scores, k, seed=11)
    check_padded_layout(sel, shapes)
    total = sum(int((v >= 0).sum()) for v in sel.values())
    assert total == gps_budget(shapes, k) == sum(s[0] * k for s in shapes.values())
    if scheme == "layer":
        for n, v in sel.items():
            assert int((v >= 0).sum()) == shapes[n][0] * k
    if scheme in ("gps", "random-neuron", "magnitude"):
        for n, v in sel.items():
            assert v.shape == (shapes[n][0], k) and bool((v >= 0).all())


# --------------------------------------------------------------------------- random


@pytest.mark.parametrize("scheme", ["random-net", "random-neuron"])
def test_random_reproducible_and_seed_dependent(scheme):
    shapes = {"x.weight": (20, 30), "y.weight": (8, 4, 3, 3)}
    scores = {n: torch.zeros(s) for n, s in shapes.items()}
    a = select(scheme, scores, None, 2, seed=1)
    b = select(scheme, scores, None, 2, seed=1)
    c = select(scheme, scores, None, 2, seed=2)
    assert all(torch.equal(a[n], b[n]) for n in shapes)
    assert as_entry_set(a) != as_entry_set(c)
    check_padded_layout(a, shapes)
    # shapes only: passing weights instead of scores gives the same selection
    d = select(scheme, None, scores, 2, seed=1)
    assert all(torch.equal(a[n], d[n]) for n in shapes)


def test_random_net_dense_branch_is_exact():
    # budget >= a quarter of all entries takes the permutation branch
    shapes = {"w": (4, 2)}
    sel = select("random-net", {"w": torch.zeros(4, 2)}, None, 1, seed=0)
    check_padded_layout(sel, shapes)
    assert len(as_entry_set(sel)) == 4


def test_random_neuron_roughly_uniform():
    counts = torch.zeros(4)
    scores = {"w": torch.zeros(1, 4)}
    for seed in range(400):
        counts[select("random-neuron", scores, None, 1, seed)["w"][0, 0]] += 1
    assert counts.min() > 60 and counts.max() < 140, counts


def test_random_net_roughly_uniform_over_tensors():
    # 1 of 2*40 entries; tensor a holds 1/4 of all entries
    scores = {"a": torch.zeros(1, 20), "b": torch.zeros(1, 60)}
    hits_a = 0
    for seed in range(400):
        sel = select("random-net", scores, None, 1, seed)
        hits_a += int((sel["a"] >= 0).sum())
    # budget 2 entries per draw: expected 2 * 400 / 4 = 200 in a
    assert 150 < hits_a < 250, hits_a


def test_deterministic_schemes_ignore_seed():
    _, scores = make_scores()
    for scheme in ("gps", "net", "layer", "magnitude"):
        a = select(scheme, scores, scores, 2, seed=0)
        b = select(scheme, scores, scores, 2, seed=99)
        assert all(torch.equal(a[n], b[n]) for n in a)


# --------------------------------------------------------------------------- errors


def test_unknown_scheme_lists_valid():
    with pytest.raises(ValueError) as e:
        select("gradient-magic", {"w": torch.zeros(2, 2)}, None, 1, 0)
    msg = str(e.value)
    assert "gradient-magic" in msg
    for s in SCHEMES:
        assert s in msg


@pytest.mark.parametrize("k", [0, -1, 13])
def test_bad_k_names_parameter_and_fan_in(k):
    scores = {"ok.weight": torch.zeros(3, 20), "blocks.0.conv.weight": torch.zeros(2, 3, 2, 2)}
    with pytest.raises(ValueError) as e:
        select("gps", scores, None, k, 0)
    msg = str(e.value)
    if k > 0:  # the first parameter fits, the conv (fan_in 3*2*2) does not
        assert "blocks.0.conv.weight" in msg and "fan_in=12" in msg
    else:
        assert "ok.weight" in msg and "fan_in=20" in msg


def test_missing_inputs():
    with pytest.raises(ValueError, match="weights"):
        select("magnitude", {"w": torch.zeros(2, 2)}, None, 1, 0)
    with pytest.raises(ValueError, match="scores"):
        select("gps", None, {"w": torch.zeros(2, 2)}, 1, 0)
    with pytest.raises(ValueError, match="2 dimensions"):
        select("gps", {"bias": torch.zeros(4)}, None, 1, 0)
    with pytest.raises(ValueError, match="no weight"):
        select("magnitude", {"w": torch.zeros(2, 2)}, {"v": torch.zeros(2, 2)}, 1, 0)
