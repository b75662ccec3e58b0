import math

import pytest
import torch
import torch.nn.functional as F

from gps_ds.selection.losses import make_score_loss, supcon_loss


def naive_supcon(features, labels, t):
    """Khosla et al. eq. 2, written as a plain double loop over anchors."""
    n, v, _ = features.shape
    z = [F.normalize(features[i, j], dim=0) for j in range(v) for i in range(n)]
    y = [int(labels[i]) for j in range(v) for i in range(n)]
    total, anchors = 0.0, 0
    for a in range(len(z)):
        denom = sum(math.exp(float(z[a] @ z[b]) / t) for b in range(len(z)) if b != a)
        pos = [p for p in range(len(z)) if p != a and y[p] == y[a]]
        if not pos:
            continue
        total += -sum(math.log(math.exp(float(z[a] @ z[p]) / t) / denom) for p in pos) / len(pos)
        anchors += 1
    return total / anchors


@pytest.mark.parametrize("t", [0.07, 0.5])
def test_supcon_matches_naive(t):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 2, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 1])
    got = supcon_loss(feats, labels, t).item()
    assert got == pytest.approx(naive_supcon(feats, labels, t), rel=1e-5)


def test_supcon_perfect_clusters_lower_than_random():
    labels = torch.tensor([0, 0, 1, 1])
    good = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])[:, None, :].repeat(1, 2, 1)
    bad = torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]])[:, None, :].repeat(1, 2, 1)
    assert supcon_loss(good, labels) < supcon_loss(bad, labels)


def test_ce_and_bad_names():
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    assert make_score_loss("ce")(model, x, y).item() == pytest.approx(F.cross_entropy(model(x), y).item())
    with pytest.raises(ValueError, match="unknown gps.loss 'mse'"):
        make_score_loss("mse")
    with pytest.raises(ValueError, match="task"):
        make_score_loss("task")
