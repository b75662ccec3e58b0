"""Launched by tests/test_zero_scoring_dist.py under `deepspeed --num_gpus N` (CPU ranks, gloo).

For every requested ZeRO stage: a fresh timm `test_vit` (img 32, 3 classes, seed 0), a scoring
engine (SGD lr 0, never stepped), one pass over fixed seeded batches (each rank its share of
every global batch), selection from the per-rank gradient fragments, and on rank 0 a
comparison against the single-process reference (`accumulate_scores` on the global batches,
top-K by a brute-force stable sort here).  Rank 0 writes counts to --out (JSON); the test
asserts on them.

What "equal" means (check_groups): score-based selections (gps, layer, net) must equal the
brute-force top-K of the single-process scores on every row, except where that row's
single-process scores tie at the K-th value within twice the tensor's largest difference
between the distributed and the single-process scores (itself asserted < 1e-5 of the tensor's
largest score): only there can another summation order swap two entries.  Weight- and shape-only schemes (magnitude, random-neuron) have no
numerical reason to differ and must be bit-for-bit equal.

Usage: deepspeed --num_gpus 2 zero_scoring_check.py --stages 0,1,2,3 --out res.json [--supcon] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from gps_ds.distributed import init_distributed  # noqa: E402
from gps_ds.models import create_model  # noqa: E402
from gps_ds.rules import classify  # noqa: E402
from gps_ds.selection.losses import make_score_loss  # noqa: E402
from gps_ds.selection.schemes import rows_and_fan_in, select  # noqa: E402
from gps_ds.selection.scoring import accumulate_scores  # noqa: E402
from gps_ds.selection import zero_scoring as zs  # noqa: E402

NB, B, IMG, CLASSES = 4, 12, 32, 3
KS = (1, 3)


def zero_section(stage):
    # Threshold 0: ZeRO-3 partitions every parameter and gathers it on demand (the default keeps
    # tensors under 1e5 entries whole on every rank, i.e. all of test_vit).
    return {"stage": stage, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}


def build_model():
    torch.manual_seed(0)
    return create_model("test_vit", CLASSES, img_size=IMG)


def make_data(two_views: bool):
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(NB):
        x = torch.randn(B, 3, IMG, IMG, generator=g)
        y = torch.randint(0, CLASSES, (B,), generator=g)
        if two_views:
            x = (x, torch.flip(x, dims=[3]) + 0.1 * torch.randn(B, 3, IMG, IMG, generator=g))
        out.append((x, y))
    return out


# Scores of two runs that add the same gradients in another order differ by rounding only.
# With e = max |dist - ref| over a tensor (measured; the test asserts < 1e-5 * max |ref|), an entry
# can be in one top-K and not in the other only if its single-process score lies within 2e of
# the K-th single-process score (d[c] >= d[c'] gives ref[c] >= ref[c'] - 2e).  That is the tie
# tolerance: per tensor, twice the measured score difference.


def brute_topk(v: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask (same shape as the 2-D ``v``) of each row's top-``n``, by a full stable sort:
    larger first, equal -> smaller index first (the project's documented tie rule)."""
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :n]
    return torch.zeros_like(v, dtype=torch.bool).scatter_(1, order, True)


def padded_to_mask(sel: torch.Tensor, rows: int, fan_in: int) -> torch.Tensor:
    """(rows, C) columns, -1 padded -> (rows, fan_in) bool mask; repeated columns are counted
    (a column listed twice would make the row's count wrong, which the check sees)."""
    sel = sel.long()
    mask = torch.zeros(rows, fan_in, dtype=torch.int64)
    valid = sel >= 0
    r = torch.arange(rows).unsqueeze(1).expand_as(sel)
    mask.index_put_((r[valid], sel[valid]), torch.ones(int(valid.sum()), dtype=torch.int64), accumulate=True)
    return mask


def check_groups(counts: torch.Tensor, ref: torch.Tensor, n: int, tol: torch.Tensor) -> dict:
    """A selection (``counts``: times each entry was selected, one group per row) against the
    single-process scores ``ref`` (same shape, float64) of which each group keeps its top-``n``.

    * every group selects exactly ``n`` distinct entries;
    * a group may differ from the brute-force top-``n`` of ``ref`` only at a near-tie: every
      selected entry has ``ref >= thr - tol`` and every other entry ``ref <= thr + tol``, with
      ``thr`` the ``n``-th largest ``ref`` of the group and ``tol`` (per entry) twice its
      tensor's measured score difference.  Without a near-tie this forces equality.
    """
    mask = counts > 0
    bad_count = int(((counts > 1).any(dim=1) | (mask.sum(dim=1) != n)).sum())
    want = brute_topk(ref, n)
    differ = (mask != want).any(dim=1)
    thr = torch.sort(ref, dim=1, descending=True).values[:, n - 1 : n]
    violates = (mask & (ref < thr - tol)) | (~mask & (ref > thr + tol))
    unexplained = violates.any(dim=1)
    # Groups where a near-tie at the n-th value exists at all (an entry on each side of thr
    # within tol): only these may differ.
    nxt = torch.sort(ref, dim=1, descending=True).values[:, n : n + 1] if ref.shape[1] > n else thr - float("inf")
    tie = ((thr - nxt) <= tol.max(dim=1, keepdim=True).values).flatten()
    return {"groups": int(ref.shape[0]), "bad_count": bad_count, "differ": int(differ.sum()),
            "differ_unexplained": int((differ & unexplained).sum()), "violations": int(violates.sum()),
            "near_tie_groups": int(tie.sum()), "differ_without_near_tie": int((differ & ~tie).sum())}


def merge_checks(parts: list[dict]) -> dict:
    out: dict = {}
    for p in parts:
        for key, v in p.items():
            out[key] = out.get(key, 0) + v
    return out


def tie_tolerance(dist_scores, ref_scores) -> dict[str, float]:
    """Per tensor: twice the largest |distributed - single-process| score difference."""
    return {n: 2 * float((dist_scores[n].double() - r.double()).abs().max()) for n, r in ref_scores.items()}


def _tol(tols, n, rows, fan_in):
    return torch.full((rows, fan_in), tols[n], dtype=torch.float64)


def check_gps(sel, ref_scores, k, tols) -> dict:
    """Per row: top-K of the single-process scores up to near-ties (``check_groups``)."""
    parts = []
    for n, s in ref_scores.items():
        rows, fan_in = rows_and_fan_in(n, s.shape)
        v = s.reshape(rows, fan_in).double()
        parts.append(check_groups(padded_to_mask(sel[n], rows, fan_in), v, k, _tol(tols, n, rows, fan_in)))
    out = merge_checks(parts)
    out["tensors_missing"] = len(set(ref_scores) ^ set(sel))
    return out


def check_layer(sel, ref_scores, k, tols) -> dict:
    """Per tensor, one group of rows*K entries over the whole tensor."""
    parts = []
    for n, s in ref_scores.items():
        rows, fan_in = rows_and_fan_in(n, s.shape)
        counts = padded_to_mask(sel[n], rows, fan_in).reshape(1, -1)
        parts.append(check_groups(counts, s.reshape(1, -1).double(), rows * k,
                                  _tol(tols, n, rows, fan_in).reshape(1, -1)))
    return merge_checks(parts)


def check_net(sel, ref_scores, k, tols) -> dict:
    """One group over every candidate entry, N = sum of rows*K."""
    counts, vals, tol, budget = [], [], [], 0
    for n, s in ref_scores.items():
        rows, fan_in = rows_and_fan_in(n, s.shape)
        counts.append(padded_to_mask(sel[n], rows, fan_in).reshape(-1))
        vals.append(s.reshape(-1).double())
        tol.append(_tol(tols, n, rows, fan_in).reshape(-1))
        budget += rows * k
    return check_groups(torch.cat(counts).view(1, -1), torch.cat(vals).view(1, -1), budget, torch.cat(tol).view(1, -1))


def exact_equal(sel, ref_sel) -> dict:
    """Tensors whose selection is not bit-for-bit the single-process one (no tolerance)."""
    differ = [n for n in ref_sel if n not in sel or not torch.equal(sel[n].long(), ref_sel[n].long())]
    return {"tensors": len(ref_sel), "tensors_differ": len(differ) + len(set(sel) - set(ref_sel)),
            "rows_differ": sum(int((sel[n].long() != ref_sel[n].long()).any(dim=1).sum())
                               for n in ref_sel if n in sel and sel[n].shape == ref_sel[n].shape)}


def magnitude_reference(weights, k):
    """Per row top-K of |W| by brute force (weights are the same numbers on every path)."""
    out = {}
    for n, w in weights.items():
        rows, fan_in = rows_and_fan_in(n, w.shape)
        m = brute_topk(w.reshape(rows, fan_in).abs(), k)
        out[n] = m.nonzero()[:, 1].view(rows, k)  # nonzero is row-major: columns ascending per row
    return out


def selection_digest(sels: list) -> torch.Tensor:
    """sha256 of every selection (names, shapes, indices) as 4 int64, to compare across ranks."""
    import hashlib

    h = hashlib.sha256()
    for sel in sels:
        for n in sorted(sel):
            t = sel[n].to(torch.int64).contiguous()
            h.update(n.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.int64).clone()


def watch_backward(engine):
    """Snapshot the engine's buffers at the end of each backward, before ZeRO frees its buckets."""
    peak: dict = {}
    opt = engine.optimizer
    if not hasattr(opt, "independent_gradient_partition_epilogue"):
        return None
    orig = opt.independent_gradient_partition_epilogue

    def wrapped(*a, **kw):
        rep = zs.engine_memory_report(engine)
        if rep["wrapper_bytes"] + rep["param_grad_bytes"] >= peak.get("wrapper_bytes", 0) + peak.get("param_grad_bytes", 0):
            peak.clear()
            peak.update(rep)
        return orig(*a, **kw)

    opt.independent_gradient_partition_epilogue = wrapped
    return peak


def adam_reference(cfg, cands, local):
    """What the same engine holds with AdamW after one real step (the state scoring avoids)."""
    import deepspeed

    model = build_model()
    for n, p in model.named_parameters():
        p.requires_grad_(n in cands)
    params = [p for n, p in model.named_parameters() if n in cands]
    c = dict(cfg)
    c.pop("optimizer", None)
    c["gradient_accumulation_steps"] = 1
    c["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = deepspeed.initialize(model=zs.ScoringModule(model, make_score_loss("ce"), c["zero_optimization"]["stage"] == 3),
                                           optimizer=torch.optim.AdamW(params, lr=1e-3), model_parameters=params, config=c)
    engine.gps_candidates = list(cands)
    x, y = local[0]
    engine.backward(engine(x, y))
    engine.step()
    rep = zs.engine_memory_report(engine)
    engine.destroy()
    return rep


def reuse_check(rank, world, cands, data, local) -> dict | None:
    """Score a model under ZeRO-3, release the scoring engine, then train the same model object
    (head only, AdamW, one step) and compare with one process training a fresh model on the
    global batch: the released weights must be the fresh ones and the step the same."""
    import deepspeed

    model = build_model()
    cfg = {"train_micro_batch_size_per_gpu": B // world, "zero_optimization": zero_section(3)}
    zs.score_and_select_zero(model, local[:1], make_score_loss("ce"), cands, 1, ds_config=cfg)
    head = [p for n, p in model.named_parameters() if n.startswith("head")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(head, lr=1e-2)
    # DeepSpeed 0.19 clips to norm 1.0 by default; the reference does not clip.
    train_cfg = dict(cfg, gradient_clipping=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=head, config=train_cfg)
    x, y = local[0]
    loss = torch.nn.functional.cross_entropy(engine(x), y)
    engine.backward(loss)
    engine.step()
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine.destroy()
    if rank != 0:
        return None
    ref = build_model()
    fresh = {n: p.detach().clone() for n, p in ref.named_parameters()}
    for n, p in ref.named_parameters():
        p.requires_grad_(n.startswith("head"))
    ref_opt = torch.optim.AdamW([p for n, p in ref.named_parameters() if n.startswith("head")], lr=1e-2)
    with torch.no_grad():
        ref_local_loss = float(torch.nn.functional.cross_entropy(ref(x), y))
    gx, gy = data[0]
    # DeepSpeed averages the ranks' gradients: equal shares -> the gradient of the global mean.
    torch.nn.functional.cross_entropy(ref(gx), gy).backward()
    ref_opt.step()
    heads = [n for n in after if n.startswith("head")]
    return {
        "loss": float(loss.detach()), "ref_loss": ref_local_loss,
        "backbone_bit_identical": sum(not torch.equal(after[n], fresh[n]) for n in after if n not in heads) == 0,
        "backbone_tensors": sum(1 for n in after if n not in heads),
        "head_moved_entries": sum(int((after[n] != fresh[n]).sum()) for n in heads),
        "head_entries": sum(fresh[n].numel() for n in heads),
        "head_max_abs_err": max(float((after[n] - p.detach()).abs().max())
                                for n, p in ref.named_parameters() if n in heads),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--out", required=True)
    ap.add_argument("--supcon", action="store_true", help="also a ZeRO-3 run with the SupCon loss")
    ap.add_argument("--reuse", action="store_true", help="also score a model, then train it with AdamW")
    args, _ = ap.parse_known_args()
    rank, world = init_distributed()
    stages = [int(s) for s in args.stages.split(",") if s != ""]
    ce = make_score_loss("ce")
    data = make_data(False)
    local = [zs.shard_batch(b, rank, world) for b in data]
    cands = classify(build_model()).candidates
    report: dict = {"world_size": world, "stages": {}}

    ref_scores = None
    if rank == 0:
        t = time.perf_counter()
        ref_scores = accumulate_scores(build_model(), data, ce, cands).scores
        report["reference_seconds"] = time.perf_counter() - t
    ref_w = {n: p.detach().clone() for n, p in build_model().named_parameters() if n in cands}

    ds_config = {"train_micro_batch_size_per_gpu": B // world, "gradient_accumulation_steps": 4,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    for stage in stages:
        t0 = time.perf_counter()
        cfg = json.loads(json.dumps(ds_config))
        cfg["zero_optimization"] = zero_section(stage)
        model = build_model()
        engine = zs.build_scoring_engine(model, ce, cands, cfg)
        t_build = time.perf_counter() - t0
        peak = watch_backward(engine)
        res = zs.score_and_select_zero(engine, local, ce, cands, KS[0], gather_scores=True)
        frags = zs.grad_fragments(engine, cands)
        sels = {KS[0]: res.selection}
        t1 = time.perf_counter()
        for k in KS[1:]:
            sels[k] = zs.select_from_fragments("gps", frags, k)
        other = {s: zs.select_from_fragments(s, frags, 2) for s in ("net", "layer")}
        t_other = time.perf_counter() - t1
        mem = res.memory
        adam = adam_reference(cfg, cands, local) if stage > 0 else None
        owned = {n: f.valid for n, f in frags.items()}
        zs.release_scoring_engine(engine)
        # Weight- and shape-only schemes on the released model: under ZeRO-3 its weights stay
        # partitioned (ds_tensor fragments), otherwise every rank takes an even share of rows.
        wt = zs.score_and_select_zero(model, None, None, cands, 2, scheme="magnitude")
        rn = zs.score_and_select_zero(model, None, None, cands, 2, scheme="random-neuron", seed=5)
        # Every rank holds the same selections (sha256 of all of them, gathered).
        digest = selection_digest([*sels.values(), *other.values(), wt.selection, rn.selection])
        digests = [torch.zeros_like(digest) for _ in range(world)]
        dist.all_gather(digests, digest)
        if rank == 0:
            dense = res.scores
            err = max(float((dense[n] - ref_scores[n]).abs().max() / ref_scores[n].abs().max()) for n in cands)
            tols = tie_tolerance(dense, ref_scores)
            entry = {
                "build_seconds": t_build, "pass_seconds": res.timings.get("pass"),
                "select_seconds": res.timings.get("select"), "other_select_seconds": t_other,
                "total_seconds": time.perf_counter() - t0, "samples": res.samples, "batches": res.batches,
                "max_rel_score_err": err, "memory": mem, "memory_in_backward": peak,
                "adamw_after_one_step": adam,
                "ranks_with_other_digest": sum(not torch.equal(d, digests[0]) for d in digests),
                "rank0_owned_entries": sum(owned.values()),
                "gps": {str(k): check_gps(sels[k], ref_scores, k, tols) for k in KS},
                "net": check_net(other["net"], ref_scores, 2, tols),
                "layer": check_layer(other["layer"], ref_scores, 2, tols),
                "magnitude": exact_equal(wt.selection, magnitude_reference(ref_w, 2)),
                "random_neuron": exact_equal(rn.selection, select("random-neuron", None, ref_w, 2, 5)),
                "zero3_partitioned_weights": hasattr(dict(model.named_parameters())[cands[0]], "ds_tensor"),
            }
            report["stages"][str(stage)] = entry
            print(f"[zero_scoring_check] world {world} stage {stage}: gps {json.dumps(entry['gps'])} "
                  f"net {json.dumps(entry['net'])} layer {json.dumps(entry['layer'])} err {err:.2e} "
                  f"{entry['total_seconds']:.1f}s", flush=True)
        dist.barrier()

    if args.supcon:
        sup = make_score_loss("supcon", across_ranks=True)
        data2 = make_data(True)
        local2 = [zs.shard_batch(b, rank, world) for b in data2]
        model = build_model()
        cfg = {"train_micro_batch_size_per_gpu": B // world, "zero_optimization": zero_section(3)}
        res = zs.score_and_select_zero(model, local2, sup, cands, 1, ds_config=cfg, gather_scores=True)
        if rank == 0:
            # SupCon across ranks contrasts with the whole global batch: the reference is one
            # process on the global batches; DeepSpeed averages gradients over ranks (1/world).
            sref = accumulate_scores(build_model(), data2, make_score_loss("supcon"), cands).scores
            sref = {n: s / world for n, s in sref.items()}
            err = max(float((res.scores[n] - sref[n]).abs().max() / sref[n].abs().max()) for n in cands)
            report["supcon_zero3"] = {"max_rel_score_err": err,
                                      **check_gps(res.selection, sref, 1, tie_tolerance(res.scores, sref))}

    if args.reuse:
        report["reuse_after_release"] = reuse_check(rank, world, cands, data, local)

    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
