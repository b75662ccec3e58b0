import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gps_ds.models import create_model
from gps_ds.rules import classify
from gps_ds.selection.losses import make_score_loss
from gps_ds.selection.scoring import ScoringError, accumulate_scores


def _batches(n=3, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 6, generator=g), torch.randint(0, 3, (bs,), generator=g)) for _ in range(n)]


def test_signed_sum_then_abs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = _batches()
    # Independent reference: per-batch gradients by torch.autograd.grad, summed with sign.
    ref = torch.zeros_like(model[0].weight)
    for x, y in batches:
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), [model[0].weight])
        ref += g
    res = accumulate_scores(model, batches, make_score_loss("ce"), ["0.weight"])
    assert torch.allclose(res.scores["0.weight"], ref.abs(), atol=1e-7)
    assert res.batches == 3 and res.samples == 12
    # The signed sum differs from the sum of absolute values: the sign matters.
    abs_sum = sum(torch.autograd.grad(F.cross_entropy(model(x), y), [model[0].weight])[0].abs() for x, y in batches)
    assert not torch.allclose(res.scores["0.weight"], abs_sum)
    # Flags, grads and mode restored.
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_max_batches_empty_and_nan():
    model = nn.Sequential(nn.Linear(6, 3))
    res = accumulate_scores(model, _batches(5), make_score_loss("ce"), ["0.weight"], max_batches=2)
    assert res.batches == 2
    with pytest.raises(ScoringError, match="empty"):
        accumulate_scores(model, [], make_score_loss("ce"), ["0.weight"])
    with pytest.raises(ScoringError, match="not finite at batch 0"):
        accumulate_scores(model, [(torch.full((2, 6), float("nan")), torch.tensor([0, 1]))], make_score_loss("ce"), ["0.weight"])
    # The first non-finite batch is named (found on the device, read once at the end), not a later one.
    batches = _batches(5)
    batches[2] = (torch.full((4, 6), float("inf")), batches[2][1])
    batches[4] = (torch.full((4, 6), float("nan")), batches[4][1])
    with pytest.raises(ScoringError, match="not finite at batch 2$"):
        accumulate_scores(model, batches, make_score_loss("ce"), ["0.weight"])
    with pytest.raises(ScoringError, match="'nope.weight'"):
        accumulate_scores(model, _batches(), make_score_loss("ce"), ["nope.weight"])


def test_supcon_scores_on_timm_vit_are_deterministic():
    torch.manual_seed(0)
    model = create_model("test_vit", 3, img_size=32)
    roles = classify(model)
    g = torch.Generator().manual_seed(1)
    batches = [((torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)), torch.tensor([0, 1, 0, 2]))
               for _ in range(2)]
    loss = make_score_loss("supcon")
    a = accumulate_scores(model, batches, loss, roles.candidates)
    b = accumulate_scores(model, batches, loss, roles.candidates)
    assert set(a.scores) == set(roles.candidates)
    for n in roles.candidates:
        assert torch.equal(a.scores[n], b.scores[n])
        assert a.scores[n].shape == dict(model.named_parameters())[n].shape
    assert float(sum(s.sum() for s in a.scores.values())) > 0


def test_supcon_scoring_leaves_the_head_and_the_model_untouched():
    """The SupCon loss works on the pre-logits feature: the head is never called, its weights
    and gradients stay as they were, the scores do not depend on it, and every parameter, flag
    and the train/eval mode are what they were before (compared with copies taken before)."""
    torch.manual_seed(0)
    model = create_model("test_vit", 3, img_size=32)
    roles = classify(model)
    assert roles.head, "test_vit has a head"
    g = torch.Generator().manual_seed(1)
    batches = [((torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)), torch.tensor([0, 1, 0, 2]))
               for _ in range(2)]
    params = dict(model.named_parameters())
    # A mixed set of flags, so "restored" cannot mean "all True".
    frozen = [n for n in params if "norm" in n][:2]
    for n in frozen:
        params[n].requires_grad_(False)
    model.train()
    before = {n: p.detach().clone() for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    calls = []
    hook = model.get_submodule(roles.head[0].rsplit(".", 1)[0]).register_forward_hook(lambda *a: calls.append(1))
    try:
        res = accumulate_scores(model, batches, make_score_loss("supcon"), roles.candidates)
    finally:
        hook.remove()
    assert calls == [], "the head module ran during SupCon scoring"
    for n, p in params.items():
        assert torch.equal(p.detach(), before[n]), f"{n} changed"
        assert p.requires_grad == flags[n], f"{n}: requires_grad not restored"
        assert p.grad is None, f"{n}: gradient left behind"
    assert model.training
    # The scores do not depend on the head: another head gives the same scores, bit for bit.
    with torch.no_grad():
        for n in roles.head:
            params[n].copy_(torch.randn(params[n].shape, generator=g))
    other = accumulate_scores(model, batches, make_score_loss("supcon"), roles.candidates)
    for n in roles.candidates:
        assert torch.equal(res.scores[n], other.scores[n]), n
    assert float(sum(s.sum() for s in res.scores.values())) > 0
