"""Per-row top-K: dense against a brute-force reference, and sharded against dense."""

from __future__ import annotations

import math
import random

import pytest
import torch

from gps_ds.selection.topk import (
    PartialCandidates,
    ShardTopK,
    assemble_sharded_topk,
    merge_partial_candidates,
    pack_partials,
    rowwise_topk,
    shard_rows_topk,
    simulate_sharded_topk,
    unpack_partials,
    zero_shard_size,
)


def brute_topk(scores_2d: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: python sort by (-score, column), take k, sort ascending."""
    rows = []
    for row in scores_2d.tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        rows.append(sorted(order[:k]))
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), k)


# --------------------------------------------------------------------------- dense


def test_hand_worked_ties():
    s = torch.tensor(
        [
            [1.0, 3.0, 3.0, 2.0, 3.0],  # three 3s: k=2 takes columns 1, 2
            [0.0, 0.0, 0.0, 0.0, 0.0],  # all equal: leftmost
            [5.0, 1.0, 4.0, 4.0, 0.0],  # 5 then the first 4
            [0.0, 0.0, 0.0, 0.0, 9.0],
        ]
    )
    assert rowwise_topk(s, 1).tolist() == [[1], [0], [0], [4]]
    assert rowwise_topk(s, 2).tolist() == [[1, 2], [0, 1], [0, 2], [0, 4]]
    assert rowwise_topk(s, 3).tolist() == [[1, 2, 4], [0, 1, 2], [0, 2, 3], [0, 1, 4]]
    assert rowwise_topk(s, 5).tolist() == [list(range(5))] * 4
    assert rowwise_topk(s, 0).shape == (4, 0)


def test_output_dtype_and_sorted():
    s = torch.rand(6, 50, generator=torch.Generator().manual_seed(1))
    out = rowwise_topk(s, 7)
    assert out.dtype == torch.int64 and out.shape == (6, 7)
    assert torch.all(out[:, 1:] > out[:, :-1])


@pytest.mark.parametrize("levels", [2, 3, 1000, None])
def test_matches_bruteforce_random(levels):
    gen = torch.Generator().manual_seed(levels or 7)
    rng = random.Random(levels or 7)
    for _ in range(60):
        rows, cols = rng.randint(1, 9), rng.randint(1, 40)
        if levels is None:
            s = torch.rand(rows, cols, generator=gen)
        else:
            s = torch.randint(0, levels, (rows, cols), generator=gen).float()
        k = rng.randint(0, cols)
        assert torch.equal(rowwise_topk(s, k), brute_topk(s, k)), (s, k)


def test_mixed_tied_and_untied_rows():
    # rows 0 and 2 tie at the boundary, row 1 does not: the fix-up touches only some rows
    s = torch.tensor([[2.0, 1.0, 1.0, 1.0], [4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 2.0]])
    assert rowwise_topk(s, 2).tolist() == [[0, 1], [0, 1], [0, 3]]


def test_half_and_int_dtypes():
    s = torch.tensor([[1, 3, 3, 2]], dtype=torch.int64)
    assert rowwise_topk(s, 2).tolist() == [[1, 2]]
    assert rowwise_topk(s.to(torch.bfloat16), 2).tolist() == [[1, 2]]


def test_rejects_nan_and_bad_k():
    s = torch.tensor([[1.0, float("nan"), 0.0]])
    for k in (1, 2, 3):
        with pytest.raises(ValueError, match="NaN"):
            rowwise_topk(s, k)
    with pytest.raises(ValueError):
        rowwise_topk(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError):
        rowwise_topk(torch.zeros(2, 3), -1)
    with pytest.raises(ValueError):
        rowwise_topk(torch.zeros(6), 1)


# --------------------------------------------------------------------------- sharded

SHAPES = [
    (7, 5),
    (4, 13),
    (6, 3, 2, 2),  # conv: fan_in 12
    (3, 1),
    (1, 17),
    (2, 40),  # world 3/4: a slice is shorter than one row
    (5, 2, 3, 1),
    (9, 6),
]


def test_zero_shard_size():
    assert zero_shard_size(10, 3) == 4
    assert zero_shard_size(12, 4) == 3
    assert zero_shard_size(5, 1) == 5


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_equals_dense_exhaustive_k(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    rows = shape[0]
    fan_in = math.prod(shape[1:])
    for trial, levels in enumerate((2, 4, None)):
        if levels is None:
            s = torch.rand(shape, generator=gen)
        else:
            s = torch.randint(0, levels, shape, generator=gen).float()
        for k in range(1, fan_in + 1):
            dense = rowwise_topk(s.reshape(rows, fan_in), k)
            assert torch.equal(dense, brute_topk(s.reshape(rows, fan_in), k))
            for world in (1, 2, 3, 4):
                # padding far above every score must still never be selected
                pad = float("inf") if trial % 2 == 0 else 0.0
                got = simulate_sharded_topk(s, world, k, pad_value=pad)
                assert torch.equal(got, dense), (shape, k, world, levels)


def test_sharded_larger_random_many_ties():
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(3)
    for _ in range(40):
        rows, fan_in = rng.randint(1, 12), rng.randint(1, 64)
        s = torch.randint(0, 3, (rows, fan_in), generator=gen).float()
        k = rng.choice([1, 2, fan_in, rng.randint(1, fan_in)])
        world = rng.randint(1, 4)
        assert torch.equal(simulate_sharded_topk(s, world, k), brute_topk(s, k))


def test_shard_rows_topk_hand_worked():
    # 3 rows of 4, numel 12, 2 ranks of 6: rank 0 = row 0 + half of row 1.
    s = torch.tensor([[0, 5, 5, 1], [2, 7, 7, 2], [9, 0, 0, 9]], dtype=torch.float32).reshape(-1)
    r0 = shard_rows_topk(s[:6], 0, 12, 4, 2)
    assert r0.first_row == 0 and r0.complete.tolist() == [[1, 2]]
    assert len(r0.partials) == 1
    p = r0.partials[0]
    assert p.row_id == 1 and p.cols.tolist() == [0, 1] and p.values.tolist() == [2.0, 7.0]
    r1 = shard_rows_topk(s[6:], 6, 12, 4, 2)
    assert r1.first_row == 2 and r1.complete.tolist() == [[0, 3]]
    assert [(q.row_id, q.cols.tolist()) for q in r1.partials] == [(1, [2, 3])]
    merged = merge_partial_candidates(r0.partials + r1.partials, 2)
    assert merged[1].tolist() == [1, 2]
    assert assemble_sharded_topk([r1, r0], 3, 2).tolist() == [[1, 2], [1, 2], [0, 3]]


def test_slice_inside_one_row_and_empty_tail_rank():
    # one row of 10 over 4 ranks of 3 (last rank: 1 valid entry + 2 padding)
    s = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0])
    parts = []
    for rank in range(4):
        local = torch.full((3,), 100.0)
        n = max(0, min(3, 10 - 3 * rank))
        local[:n] = s[3 * rank : 3 * rank + n]
        r = shard_rows_topk(local, 3 * rank, 10, 10, 3)
        assert r.complete.shape == (0, 3)
        assert len(r.partials) == 1 and r.partials[0].row_id == 0
        assert r.partials[0].cols.numel() == min(3, n)
        parts.extend(r.partials)
    assert merge_partial_candidates(parts, 3)[0].tolist() == [4, 5, 7]
    # a rank whose slice starts past numel contributes nothing
    empty = shard_rows_topk(torch.zeros(3), 12, 10, 10, 3)
    assert empty.complete.shape == (0, 3) and empty.partials == []


def test_merge_detects_missing_shard():
    p = PartialCandidates(0, torch.tensor([1.0]), torch.tensor([3]))
    with pytest.raises(ValueError, match="missing"):
        merge_partial_candidates([p], 2)
    with pytest.raises(ValueError):
        assemble_sharded_topk([ShardTopK(0, torch.zeros(1, 1, dtype=torch.long), [])], 2, 1)


def test_pack_unpack_roundtrip():
    k = 3
    parts = [
        PartialCandidates(4, torch.tensor([0.25, 1e-30]), torch.tensor([7, 1000001])),
        PartialCandidates(5, torch.tensor([1.5, 2.5, 3.5]), torch.tensor([0, 1, 2])),
    ]
    packed = pack_partials(parts, k)
    assert packed.shape == (2, 2 + 2 * k)
    back = unpack_partials(packed, k)
    assert [b.row_id for b in back] == [4, 5]
    for a, b in zip(parts, back):
        assert torch.equal(a.cols, b.cols)
        assert torch.equal(a.values.double(), b.values)
    assert unpack_partials(pack_partials([], k), k) == []
    stacked = torch.stack([packed, pack_partials(parts[:1], k)])
    assert [b.row_id for b in unpack_partials(stacked, k)] == [4, 5, 4]


def test_merge_independent_of_gather_order():
    # all_gather order is rank order, but the merge must not rely on it
    gen = torch.Generator().manual_seed(9)
    rng = random.Random(9)
    for _ in range(30):
        rows, fan_in = rng.randint(1, 4), rng.randint(2, 30)
        s = torch.randint(0, 2, (rows, fan_in), generator=gen).float()
        k = rng.randint(1, fan_in)
        world = rng.randint(2, 4)
        numel = rows * fan_in
        size = zero_shard_size(numel, world)
        flat = torch.cat([s.reshape(-1), torch.full((size * world - numel,), 5.0)])
        results = [shard_rows_topk(flat[r * size : (r + 1) * size], r * size, numel, fan_in, k)
                   for r in range(world)]
        rng.shuffle(results)
        shuffled = [ShardTopK(r.first_row, r.complete, list(reversed(r.partials))) for r in results]
        assert torch.equal(assemble_sharded_topk(shuffled, rows, k), brute_topk(s, k))
