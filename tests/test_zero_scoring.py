"""Selection from per-rank gradient fragments (gps_ds.selection.zero_scoring), in one process.

The collectives are replaced by an in-process all_gather between threads (one thread per
simulated rank), so the exact protocol the ranks run — fragments of any layout, straddling
rows, ranks owning nothing, ties — is checked against the single-process `select` quickly.
The multi-rank DeepSpeed runs are in test_zero_scoring_dist.py.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from gps_ds.selection import zero_scoring as zs
from gps_ds.selection.schemes import select

SHAPES = {
    "a.weight": (7, 5),
    "conv.weight": (4, 3, 2, 2),
    "tiny.weight": (1, 2),
    "b.weight": (16, 3),
    "wide.weight": (3, 40),
}


class ThreadComm:
    """all_gather among `world` threads; thread-local rank."""

    def __init__(self, world: int):
        self.world = world
        self.slots = [None] * world
        self.barrier = threading.Barrier(world, timeout=30)
        self.local = threading.local()

    def all_gather(self, t: torch.Tensor):
        r = self.local.rank
        self.slots[r] = t.clone()
        self.barrier.wait()
        out = [s.clone() for s in self.slots]
        self.barrier.wait()
        return out


@pytest.fixture
def comm_factory(monkeypatch):
    def make(world: int) -> ThreadComm:
        comm = ThreadComm(world)
        monkeypatch.setattr(zs, "_all_gather", comm.all_gather)
        monkeypatch.setattr(zs, "_distributed", lambda: world > 1)
        monkeypatch.setattr(zs, "_world", lambda: (getattr(comm.local, "rank", 0), world))
        return comm

    return make


def run_ranks(comm: ThreadComm, fn):
    results, errors = [None] * comm.world, []

    def body(r):
        comm.local.rank = r
        try:
            results[r] = fn(r)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            comm.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(comm.world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def make_scores(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, s in SHAPES.items():
        if kind == "ties":  # signed small integers: many ties, the tie rule decides
            out[n] = (torch.randint(-3, 4, s, generator=g)).float()
        else:
            out[n] = torch.randn(s, generator=g)
    return out


def fragments(scores: dict[str, torch.Tensor], layout: str, rank: int, world: int) -> dict[str, zs.Fragment]:
    """This rank's fragments under the layouts DeepSpeed produces."""
    out = {}
    if layout == "zero3":  # every tensor split in ceil(numel/world) slices, end padded
        for n, s in scores.items():
            numel = s.numel()
            size = math.ceil(numel / world)
            start = rank * size
            buf = torch.full((size,), 1e9)  # padding must never be selected
            valid = max(0, min(size, numel - start))
            buf[:valid] = s.reshape(-1)[start : start + valid]
            out[n] = zs.Fragment(tuple(s.shape), start, buf if valid else None)
    elif layout == "flat":  # ZeRO-1/2: one flat buffer of all tensors split evenly
        total = sum(s.numel() for s in scores.values())
        size = math.ceil(total / world)
        lo, hi = rank * size, (rank + 1) * size
        off = 0
        for n, s in scores.items():
            a, b = max(lo, off), min(hi, off + s.numel())
            if a < b:
                out[n] = zs.Fragment(tuple(s.shape), a - off, s.reshape(-1)[a - off : b - off].clone())
            else:
                out[n] = zs.Fragment(tuple(s.shape), 0, None)
            off += s.numel()
    elif layout == "rows":  # stage 0: whole gradients, an even share of rows each
        for n, s in scores.items():
            start, length = zs._row_share(tuple(s.shape), rank, world)
            out[n] = zs.Fragment(tuple(s.shape), start, s.reshape(-1)[start : start + length] if length else None)
    else:
        raise ValueError(layout)
    return out


@pytest.mark.parametrize("layout", ["zero3", "flat", "rows"])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", ["ties", "float"])
def test_fragment_selection_equals_single_process(comm_factory, layout, world, kind):
    scores = make_scores(kind, seed=world)
    abs_scores = {n: s.abs() for n, s in scores.items()}
    comm = comm_factory(world)
    for k in (1, 2):
        for scheme in ("gps", "layer", "net", "magnitude"):
            got = run_ranks(comm, lambda r: zs.select_from_fragments(scheme, fragments(scores, layout, r, world), k))
            if scheme == "magnitude":
                want = select(scheme, None, scores, k)
            else:
                want = select(scheme, abs_scores, None, k)
            for r in range(world):
                assert set(got[r]) == set(want)
                for n in want:
                    assert torch.equal(got[r][n], want[n]), (scheme, k, layout, world, r, n)


@pytest.mark.parametrize("world", [1, 3])
def test_random_schemes_match_single_process(comm_factory, world):
    scores = make_scores("float")
    comm = comm_factory(world)
    for scheme in ("random-neuron", "random-net"):
        got = run_ranks(comm, lambda r: zs.select_from_fragments(scheme, fragments(scores, "zero3", r, world), 2, seed=7))
        want = select(scheme, None, scores, 2, 7)
        for r in range(world):
            assert all(torch.equal(got[r][n], want[n]) for n in want)


def test_bad_k_and_scheme():
    frags = {"a.weight": zs.Fragment((3, 4), 0, torch.ones(12))}
    with pytest.raises(ValueError, match="k=5"):
        zs.select_from_fragments("gps", frags, 5)
    with pytest.raises(ValueError, match="unknown selection scheme"):
        zs.select_from_fragments("nope", frags, 1)


def test_fragment_valid_ignores_padding():
    f = zs.Fragment((2, 3), 4, torch.arange(4.0))  # positions 4, 5 valid; 6, 7 padding
    assert f.valid == 2 and torch.equal(f.valid_values(), torch.tensor([0.0, 1.0]))
    assert zs.Fragment((2, 3), 6, torch.ones(3)).valid == 0
    assert zs.Fragment((2, 3), 0, None).valid == 0


def test_row_share_covers_rows_once():
    for rows, world in [(7, 3), (1, 4), (16, 5), (3, 3)]:
        shares = [zs._row_share((rows, 4), r, world) for r in range(world)]
        covered = [i for start, length in shares for i in range(start, start + length)]
        assert covered == list(range(rows * 4))


def test_scoring_ds_config_drops_optimizer_and_caps_bucket():
    user = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "scheduler": {"type": "WarmupLR"},
            "bf16": {"enabled": True}, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    cfg = zs.scoring_ds_config(user, candidate_numel=1000)
    assert "optimizer" not in cfg and "scheduler" not in cfg and "train_batch_size" not in cfg
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["train_micro_batch_size_per_gpu"] == 8
    assert "bf16" not in cfg  # fp32 scoring by default
    assert cfg["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}
    assert cfg["zero_allow_untested_optimizer"] is True
    assert user["optimizer"]["type"] == "AdamW"  # the caller's config is not modified
    kept = zs.scoring_ds_config(user, precision="config")
    assert kept["bf16"] == {"enabled": True} and kept["data_types"]["grad_accum_dtype"] == "fp32"
    with pytest.raises(ValueError, match="stage >= 1"):
        zs.scoring_ds_config({"bf16": {"enabled": True}}, precision="config")
    with pytest.raises(ValueError, match="fp16"):
        zs.scoring_ds_config({"fp16": {"enabled": True}}, precision="config")


def test_shard_batch_splits_views_and_labels():
    x1, x2, y = torch.arange(12.0).view(6, 2), -torch.arange(12.0).view(6, 2), torch.arange(6)
    (a, b), ly = zs.shard_batch(((x1, x2), y), 1, 3)
    assert torch.equal(a, x1[2:4]) and torch.equal(b, x2[2:4]) and torch.equal(ly, y[2:4])
    with pytest.raises(ValueError, match="evenly"):
        zs.shard_batch((x1, y), 0, 4)
