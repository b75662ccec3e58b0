"""Launched by tests/test_zero_scoring.py under `deepspeed --num_gpus N` (CPU ranks, gloo).

For every requested ZeRO stage: a fresh timm `test_vit` (img 32, 3 classes, seed 0), a scoring
engine (SGD lr 0, never stepped), one pass over fixed seeded batches (each rank its share of
every global batch), selection from the per-rank gradient fragments, and on rank 0 a
comparison against the single-process reference (`accumulate_scores` + `rowwise_topk` /
`select` on the global batches).  Rank 0 writes every number to --out (JSON); the test asserts.

Usage: deepspeed --num_gpus 2 zero_scoring_check.py --stages 0,1,2,3 --out res.json [--supcon]
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
from gps_ds.selection.topk import rowwise_topk  # noqa: E402
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


def compare_gps(sel, ref_sel, ref_scores, dist_scores, k):
    """Rows equal; for differing rows the explicit near-tie check on the dense scores."""
    rows = same = 0
    worst_gap = 0.0  # max relative score gap between entries that differ and the K-th score
    for n, r in ref_sel.items():
        s = sel[n]
        rows += r.shape[0]
        eq = (s == r).all(dim=1)
        same += int(eq.sum())
        for row in (~eq).nonzero().flatten().tolist():
            for scores in (ref_scores, dist_scores):
                rr, fan_in = rows_and_fan_in(n, scores[n].shape)
                v = scores[n].reshape(rr, fan_in)[row].double()
                kth = torch.sort(v, descending=True).values[k - 1]
                diff = set(s[row].tolist()) ^ set(r[row].tolist())
                gap = max(abs(float(v[c]) - float(kth)) for c in diff) / max(float(kth), 1e-30)
                worst_gap = max(worst_gap, gap)
    return {"rows": rows, "same_rows": same, "frac_same": same / rows, "worst_rel_gap": worst_gap}


def compare_padded(sel, ref_sel):
    total = same = 0
    for n, r in ref_sel.items():
        s = sel[n]
        total += r.shape[0]
        if s.shape == r.shape:
            same += int((s == r).all(dim=1).sum())
    return same / total


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

    ref = ref_scores = None
    if rank == 0:
        t = time.perf_counter()
        ref_model = build_model()
        ref_scores = accumulate_scores(ref_model, data, ce, cands).scores
        ref = {k: {n: rowwise_topk(s.reshape(s.shape[0], -1), k) for n, s in ref_scores.items()} for k in KS}
        report["reference_seconds"] = time.perf_counter() - t

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
        # Every rank has the same selection.
        digest = torch.tensor([float(sum(int(v.sum()) for v in sels[k].values())) for k in KS], dtype=torch.float64)
        digests = [torch.zeros_like(digest) for _ in range(world)]
        dist.all_gather(digests, digest)
        mem = res.memory
        adam = adam_reference(cfg, cands, local) if stage > 0 else None
        owned = {n: f.valid for n, f in frags.items()}
        zs.release_scoring_engine(engine)
        # Weight- and shape-only schemes on the released model: under ZeRO-3 its weights stay
        # partitioned (ds_tensor fragments), otherwise every rank takes an even share of rows.
        wt = zs.score_and_select_zero(model, None, None, cands, 2, scheme="magnitude")
        rn = zs.score_and_select_zero(model, None, None, cands, 2, scheme="random-neuron", seed=5)
        if rank == 0:
            dense = res.scores
            err = max(float((dense[n] - ref_scores[n]).abs().max() / ref_scores[n].abs().max()) for n in cands)
            entry = {
                "build_seconds": t_build, "pass_seconds": res.timings.get("pass"),
                "select_seconds": res.timings.get("select"), "other_select_seconds": t_other,
                "total_seconds": time.perf_counter() - t0, "samples": res.samples, "batches": res.batches,
                "max_rel_score_err": err, "memory": mem, "memory_in_backward": peak,
                "adamw_after_one_step": adam,
                "same_on_all_ranks": all(torch.equal(d, digests[0]) for d in digests),
                "rank0_owned_entries": sum(owned.values()),
                "gps": {str(k): compare_gps(sels[k], ref[k], ref_scores, dense, k) for k in KS},
            }
            for s in ("net", "layer"):
                entry[s] = compare_padded(other[s], select(s, ref_scores, None, 2))
            ref_w = {n: p.detach() for n, p in build_model().named_parameters() if n in cands}
            entry["magnitude"] = compare_padded(wt.selection, select("magnitude", None, ref_w, 2))
            entry["random_neuron"] = compare_padded(rn.selection, select("random-neuron", None, ref_w, 2, 5))
            entry["zero3_partitioned_weights"] = hasattr(dict(model.named_parameters())[cands[0]], "ds_tensor")
            report["stages"][str(stage)] = entry
            print(f"[zero_scoring_check] stage {stage}: {json.dumps(entry['gps'])} err {err:.2e} "
                  f"{entry['total_seconds']:.1f}s", flush=True)

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
            sref_sel = {n: rowwise_topk(s.reshape(s.shape[0], -1), 1) for n, s in sref.items()}
            err = max(float((res.scores[n] - sref[n]).abs().max() / sref[n].abs().max()) for n in cands)
            report["supcon_zero3"] = {"max_rel_score_err": err, **compare_gps(res.selection, sref_sel, sref, res.scores, 1)}

    if args.reuse:
        # Score a model under ZeRO-3, release the scoring engine, then train the same model object.
        import deepspeed

        model = build_model()
        cfg = {"train_micro_batch_size_per_gpu": B // world, "zero_optimization": zero_section(3)}
        zs.score_and_select_zero(model, local[:1], ce, cands, 1, ds_config=cfg)
        head = [p for n, p in model.named_parameters() if n.startswith("head")]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in head:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(head, lr=1e-2)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=head, config=cfg)
        x, y = local[0]
        loss = torch.nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        report["reuse_after_release"] = {"loss": float(loss), "ok": True}

    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
