"""Launched by tests/test_zero_training_dist.py under `deepspeed --num_gpus N` (CPU ranks, gloo).

Part 1, masked mode: for every requested set-up (ZeRO 0/1/2/3 fp32, stage 0 bf16) a fresh timm
`test_vit` (img 32, 3 classes, seed 0) with a fixed random selection (K=2), AdamW (wd 0.05),
the trainer's wiring (MaskedGradients.attach + ZeroMaskedHook), NB steps on seeded batches
(each rank its half of every global batch); then the weights are gathered and compared with
the initial ones on rank 0.

Part 2, sparse mode under ZeRO-3: same model in sparse mode, NB steps, evaluation on an
uneven split of a fixed eval set, the delta extracted through the trainer's
`gathered_delta`; rank 0 compares with a single-process run on the global batches.

Part 3 (--reference OPT:SETUP,...): the masked engine hook with Adam / SGD (coupled) or AdamW
(decoupled) weight decay > 0 under ZeRO 1-3 (and stage 0 bf16, frozen entries only); rank 0
compares the gathered weights with the initial ones (frozen entries) and with one process
stepping the plain torch optimizer on a dense copy (selected entries, biases, head).

Rank 0 writes the numbers to --out (JSON); the test asserts.

--trainer NAME --set key=value ...: instead, run `gps_ds.engine.Trainer(cfg).run()` and have
every rank write its engine's dense weights to <output.dir>/NAME-rank<r>.safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

# Parts 1-2 import the trainer's pieces (methods, optim, engine, evaluation) where they use them,
# so part 3 and --trainer depend only on the masked-mode hook and the public Trainer.
from gps_ds.distributed import init_distributed  # noqa: E402
from gps_ds.models import create_model  # noqa: E402
from gps_ds.rules import classify  # noqa: E402
from gps_ds.sparse.masked import selection_mask  # noqa: E402
from gps_ds.sparse.zero_hook import (  # noqa: E402
    ZeroMaskedHook,
    check_masked_supported,
    masked_needs_engine_hook,
)

NB, B, IMG, CLASSES, K = 3, 8, 32, 3, 2
TRAIN = SimpleNamespace(optimizer="adamw", lr=0.01, weight_decay=0.05, momentum=0.9)
SETUPS = {
    "0": {"zero_optimization": {"stage": 0}},
    "1": {"zero_optimization": {"stage": 1}},
    "2": {"zero_optimization": {"stage": 2}},
    "2_nohook": {"zero_optimization": {"stage": 2}},  # negative control: attach without the engine hook
    "bf16_0": {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}},
    "3": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
}


def build_model():
    torch.manual_seed(0)
    return create_model("test_vit", CLASSES, img_size=IMG)


def fixed_selection(model):
    roles = classify(model)
    g = torch.Generator().manual_seed(7)
    params = dict(model.named_parameters())
    sel = {}
    for n in roles.candidates:
        p = params[n]
        rows, fan_in = p.shape[0], p[0].numel()
        sel[n] = torch.stack([torch.randperm(fan_in, generator=g)[:K].sort().values for _ in range(rows)])
    return roles, sel


def make_batches():
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(B, 3, IMG, IMG, generator=g), torch.randint(0, CLASSES, (B,), generator=g))
            for _ in range(NB)]


def local(batch, rank, world):
    x, y = batch
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def ds_config(extra):
    cfg = {"train_micro_batch_size_per_gpu": B // dist.get_world_size(), "gradient_accumulation_steps": 1,
           "steps_per_print": 10**9, "wall_clock_breakdown": False,
           # DeepSpeed 0.19 clips to norm 1.0 by default; the single-process reference does not clip.
           "gradient_clipping": 0.0}
    cfg.update(json.loads(json.dumps(extra)))
    return cfg


def gathered_state(model):
    import deepspeed

    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def masked_run(name, rank, world, batches):
    import deepspeed

    from gps_ds.methods import prepare_model
    from gps_ds.optim import build_optimizer

    cfg = ds_config(SETUPS[name])
    model = build_model()
    roles, sel = fixed_selection(model)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    prepared = prepare_model(model, roles, "gps", sel, "masked")
    opt = build_optimizer(model, TRAIN)
    check_masked_supported(cfg)
    hooked = masked_needs_engine_hook(cfg) and not name.endswith("_nohook")
    prepared.masked.attach(opt, mask_on_backward=not masked_needs_engine_hook(cfg))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=trainable, config=cfg)
    hook = ZeroMaskedHook(engine, prepared.masked, model) if hooked else None
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    losses = []
    t0 = time.perf_counter()
    for batch in batches:
        x, y = local(batch, rank, world)
        loss = nn.functional.cross_entropy(engine(x.to(dtype)).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    seconds = time.perf_counter() - t0
    after = gathered_state(model)
    counts = torch.tensor([hook.frozen_entries if hook else -1, hook.selected_entries if hook else -1])
    dist.all_reduce(counts)
    entry = None
    if rank == 0:
        frozen_equal = selected_moved = selected_total = frozen_total = 0
        bad = []
        for n, idx in sel.items():
            keep = selection_mask(init[n].shape, idx)
            a, b0 = after[n], init[n].to(after[n].dtype)
            same = a == b0
            if not torch.equal(a[~keep], b0[~keep]):
                bad.append(n)
            frozen_equal += int(same[~keep].sum())
            frozen_total += int((~keep).sum())
            selected_moved += int((~same[keep]).sum())
            selected_total += int(keep.sum())
        others = [n for n in init if n not in sel and n not in prepared.whole]
        entry = {
            "frozen_bit_identical": not bad, "bad": bad[:5], "frozen_equal": frozen_equal, "frozen_total": frozen_total,
            "selected_moved": selected_moved, "selected_total": selected_total,
            "untrained_equal": all(torch.equal(after[n], init[n].to(after[n].dtype)) for n in others),
            "head_moved": all(not torch.equal(after[n], init[n].to(after[n].dtype)) for n in roles.head),
            "hook_frozen_entries_all_ranks": int(counts[0]), "hook_selected_entries_all_ranks": int(counts[1]),
            "optimizer": type(engine.optimizer).__name__, "losses": losses, "seconds": round(seconds, 2),
        }
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine, opt
    dist.barrier()
    return entry


# --------------------------------------------------------------------------- part 3
# The engine hook (ZeroMaskedHook) with each optimizer and weight decay > 0, against one process
# stepping a plain torch optimizer on a dense copy: what masked mode promises (sparse/masked.py,
# sparse/zero_hook.py) is that the masked weights train as if their non-selected gradients were
# 0 and the weight decay applied to the selected entries only (coupled for Adam / SGD:
# g += wd * p; decoupled for AdamW: p *= 1 - lr * wd), the other trainable tensors (biases,
# head) as usual.  Groups as the trainer builds them (gps_ds.optim.build_optimizer): weights of
# 2+ dimensions with decay, biases without.

# optimizer: (class, hyper-parameters, decoupled decay, weight decay).  AdamW's decay moves a
# weight by lr * wd * |w| per step: wd 1.0 makes that ~1e-4 here, far above fp32 rounding.
REF_OPTS = {
    "adam": (torch.optim.Adam, {"lr": 1e-3}, False, 0.1),
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}, False, 0.1),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3}, True, 1.0),
}
REF_SETUPS = {
    "1": {"zero_optimization": {"stage": 1}},
    "2": {"zero_optimization": {"stage": 2}},
    "3": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
    "bf16_0": {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}},  # frozen entries only
}


def _trainable(model, sel):
    """Masked weights and the tensors the rules train whole (biases, head) train; the rest
    (norms, position embedding, class token) is frozen."""
    whole = set(classify(model).whole)
    for n, p in model.named_parameters():
        p.requires_grad_(n in sel or n in whole)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _groups(named, wd):
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _dense_masks(model, sel):
    """Bool mask per masked weight, True at the selected entries (built here, not by gps_ds)."""
    params = dict(model.named_parameters())
    out = {}
    for n, idx in sel.items():
        p = params[n]
        m = torch.zeros(p.shape[0], p[0].numel(), dtype=torch.bool)
        out[n] = m.scatter_(1, idx, True).view(p.shape)
    return out


def reference_masked(opt_name, batches, wd):
    """One process, dense weights, plain torch optimizer: non-selected gradients zeroed and the
    decay of masked weights applied by hand to their selected entries only."""
    cls, kw, decoupled, _ = REF_OPTS[opt_name]
    model = build_model()
    _, sel = fixed_selection(model)
    masks = _dense_masks(model, sel)
    named = _trainable(model, sel)
    masked = [p for n, p in named if n in sel]
    rest = [(n, p) for n, p in named if n not in sel]
    groups = [{"params": masked, "weight_decay": 0.0}] + _groups(rest, wd)
    opt = cls(groups, **kw)
    params = dict(model.named_parameters())
    lr = kw["lr"]
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for n, m in masks.items():
                p = params[n]
                if decoupled:
                    p.copy_(torch.where(m, p * (1 - lr * wd), p))
                    p.grad.copy_(torch.where(m, p.grad, torch.zeros_like(p.grad)))
                else:
                    p.grad.copy_(torch.where(m, p.grad + wd * p, torch.zeros_like(p.grad)))
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def hook_reference_run(opt_name, setup, rank, world, batches):
    import deepspeed

    from gps_ds.sparse.masked import MaskedGradients

    cls, kw, _, wd = REF_OPTS[opt_name]
    cfg = ds_config(REF_SETUPS[setup])
    cfg["zero_allow_untested_optimizer"] = True
    model = build_model()
    roles, sel = fixed_selection(model)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    named = _trainable(model, sel)
    opt = cls(_groups(named, wd), **kw)
    masked = MaskedGradients(model, sel)
    masked.attach(opt, mask_on_backward=False)  # as the trainer does when the engine hook runs
    trainable = [p for _, p in named]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=trainable, config=cfg)
    hook = ZeroMaskedHook(engine, masked, model)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    coupled_groups = sum(1 for g in hook.inner.param_groups if g.get("gps_weight_decay"))
    for batch in batches:
        x, y = local(batch, rank, world)
        engine.backward(nn.functional.cross_entropy(engine(x.to(dtype)).float(), y))
        engine.step()
    after = gathered_state(model)
    engine.destroy()
    del engine, opt
    dist.barrier()
    if rank != 0:
        return None
    masks = _dense_masks(build_model(), sel)
    frozen_moved = sum(int((after[n] != init[n].to(after[n].dtype))[~m].sum()) for n, m in masks.items())
    frozen_total = sum(int((~m).sum()) for m in masks.values())
    untrained = roles.frozen
    entry = {"optimizer": opt_name, "setup": setup, "frozen_moved": frozen_moved, "frozen_total": frozen_total,
             "untrained_moved": [n for n in untrained if not torch.equal(after[n], init[n].to(after[n].dtype))],
             "groups_with_masked_decay": coupled_groups, "hook_frozen_entries": hook.frozen_entries}
    if setup.startswith("bf16"):
        return entry
    ref = reference_masked(opt_name, batches, wd)
    ref_nowd = reference_masked(opt_name, batches, 0.0)
    errs, sel_moved, sel_total = {}, 0, 0
    for n, a in after.items():
        if n in masks:
            m = masks[n]
            d = (a - ref[n]).abs()[m]
            sel_moved += int((a != init[n])[m].sum())
            sel_total += int(m.sum())
        else:
            d = (a - ref[n]).abs().reshape(-1)
        if n.endswith("attn.qkv.bias") and opt_name != "sgd":
            # The key bias has a gradient that is 0 in exact arithmetic (softmax is shift
            # invariant); Adam turns its rounding noise into +-lr steps: reported apart, not
            # compared (SGD keeps it as small as it is and is compared).
            third = d.numel() // 3
            errs[n + "[key]"] = float(d[third:2 * third].max())
            d = torch.cat([d[:third], d[2 * third:]])
        errs[n] = float(d.max()) if d.numel() else 0.0
    key = {n: v for n, v in errs.items() if n.endswith("[key]")}
    strict = {n: v for n, v in errs.items() if not n.endswith("[key]")}
    # How far the decay moves the selected entries (the comparison must be able to see it).
    wd_effect = max(float((ref[n] - ref_nowd[n]).abs()[m].max()) for n, m in masks.items())
    entry.update({"max_abs_err": max(strict.values()), "worst": sorted(strict.items(), key=lambda kv: -kv[1])[:4],
                  "key_bias_max_abs_err": max(key.values()) if key else None, "lr": kw["lr"], "steps": len(batches),
                  "selected_moved": sel_moved, "selected_total": sel_total, "wd_effect": wd_effect,
                  "max_abs_update": max(float((ref[n] - init[n]).abs().max()) for n in masks)})
    return entry


def eval_split(rank):
    g = torch.Generator().manual_seed(99)
    x, y = torch.randn(20, 3, IMG, IMG, generator=g), torch.randint(0, CLASSES, (20,), generator=g)
    # Uneven shares (12 / 8) in batches of different sizes: the reduction must still be exact.
    share = [(x[:7], y[:7]), (x[7:12], y[7:12])] if rank == 0 else [(x[12:20], y[12:20])]
    return (x, y), share


def reference_sparse(batches, eval_all):
    from gps_ds.methods import prepare_model
    from gps_ds.optim import build_optimizer

    model = build_model()
    roles, sel = fixed_selection(model)
    prepared = prepare_model(model, roles, "gps", sel, "sparse")
    opt = build_optimizer(model, TRAIN)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    model.eval()
    with torch.no_grad():
        x, y = eval_all
        top1 = 100.0 * float((model(x).argmax(1) == y).sum()) / y.numel()
    from gps_ds.delta import extract_delta

    return extract_delta(model, prepared.whole, None, {}), top1, losses


def sparse_zero3(rank, world, batches, tmp, stage="3"):
    import deepspeed

    from gps_ds.delta import load_delta, save_delta
    from gps_ds.engine import gathered_delta
    from gps_ds.evaluation import evaluate
    from gps_ds.methods import prepare_model
    from gps_ds.optim import build_optimizer

    cfg = ds_config(SETUPS[stage])
    model = build_model()
    roles, sel = fixed_selection(model)
    prepared = prepare_model(model, roles, "gps", sel, "sparse")
    losses = []
    opt = build_optimizer(model, TRAIN)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=trainable, config=cfg)
    t0 = time.perf_counter()
    for batch in batches:
        x, y = local(batch, rank, world)
        loss = nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    seconds = time.perf_counter() - t0
    bases = [m.weight for m in model.modules() if hasattr(m, "gps_values")]
    bases_partitioned = all(getattr(p, "ds_status", None) is not None and p.ds_status.name == "NOT_AVAILABLE"
                            and p.numel() == 0 and not p.requires_grad for p in bases)
    eval_all, share = eval_split(rank)
    res = evaluate(engine.module, share, torch.device("cpu"), torch.float32)
    delta = gathered_delta(engine.module, prepared, {"model": "test_vit"}, rank)
    path = os.path.join(tmp, "delta_zero3.safetensors")
    if rank == 0:
        save_delta(path, delta)
    dist.barrier()
    entry = None
    if rank == 0:
        ref, ref_top1, ref_losses = reference_sparse(batches, eval_all)
        saved = load_delta(path)
        shapes_ok = (set(saved.selected) == set(ref.selected) and set(saved.whole) == set(ref.whole)
                     and all(saved.selected[n][1].shape == ref.selected[n][1].shape for n in ref.selected)
                     and all(saved.whole[n].shape == ref.whole[n].shape for n in ref.whole)
                     and all(t.numel() > 0 for t in saved.whole.values()))
        idx_equal = all(torch.equal(saved.selected[n][0], ref.selected[n][0]) for n in ref.selected)
        errs = {n: float((saved.selected[n][1] - ref.selected[n][1]).abs().max()) for n in ref.selected}
        errs.update({n: float((saved.whole[n] - ref.whole[n]).abs().max()) for n in ref.whole})
        err = max(errs.values())
        # The key bias of attention has a gradient that is 0 in exact arithmetic (softmax is
        # shift-invariant); AdamW turns its rounding noise into +-lr steps that differ between
        # any two summation orders.  Compare q and v biases, and every other tensor, strictly.
        strict = dict(errs)
        for n in ref.whole:
            if n.endswith("attn.qkv.bias"):
                d = (saved.whole[n] - ref.whole[n]).abs().view(3, -1)
                strict[n] = float(torch.cat([d[0], d[2]]).max())
        err_strict = max(strict.values())
        worst = sorted(errs.items(), key=lambda kv: -kv[1])[:6]
        entry = {"shapes_full": shapes_ok, "indices_equal": idx_equal, "max_abs_err": err, "max_abs_err_no_key_bias": err_strict, "worst": worst,
                 "n_selected": len(ref.selected), "n_whole": len(ref.whole),
                 "whole_shapes": {n: list(t.shape) for n, t in saved.whole.items() if "head" in n},
                 "bases_partitioned_after_training": bases_partitioned, "top1": res.top1, "eval_count": res.count,
                 "ref_top1": ref_top1, "losses": losses, "ref_losses": ref_losses, "seconds": round(seconds, 2)}
    dist.barrier()
    return entry


# --------------------------------------------------------------------------- --trainer
def trainer_run(overrides, out_name):
    """The trainer through its public entry point (`Trainer(cfg).run()`), then every rank writes
    the dense weights its engine holds (`trainer.engine.module`) to `<output.dir>/<out_name>-rank<r>
    .safetensors`: what training actually did to the weights, not what the delta file says."""
    from safetensors.torch import save_file

    from gps_ds.config import load_config
    from gps_ds.engine import Trainer

    rank, world = init_distributed()
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, show_progress=False)
    summary = trainer.run()
    module = trainer.engine.module
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {n: p.detach().float().contiguous().clone() for n, p in module.named_parameters()}
    else:
        state = {n: p.detach().float().contiguous().clone() for n, p in module.named_parameters()}
    save_file(state, os.path.join(cfg.output.dir, f"{out_name}-rank{rank}.safetensors"),
              metadata={"world_size": str(world), "delta": str(summary.get("delta"))})
    dist.barrier()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--setups", default="1,2,bf16_0,3")
    ap.add_argument("--out")
    ap.add_argument("--sparse", action="store_true")
    ap.add_argument("--sparse-stages", default="3")
    ap.add_argument("--reference", default="", help="optimizer:setup pairs for part 3, e.g. adam:1,sgd:3")
    ap.add_argument("--trainer", metavar="NAME", help="run the Trainer with the --set overrides instead; every "
                    "rank saves its engine weights to <output.dir>/NAME-rank<r>.safetensors")
    ap.add_argument("--set", action="append", default=[], help="config override for --trainer (key=value)")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    if args.trainer:
        return trainer_run(args.set, args.trainer)
    rank, world = init_distributed()
    torch.set_num_threads(1)
    batches = make_batches()
    report = {"world": world, "masked": {}}
    for name in [s for s in args.setups.split(",") if s]:
        report["masked"][name] = masked_run(name, rank, world, batches)
        if rank == 0:
            print(f"[zero_training_check] masked {name}: {json.dumps(report['masked'][name])}", flush=True)
    report["reference"] = {}
    for pair in [p for p in args.reference.split(",") if p]:
        opt_name, setup = pair.split(":")
        report["reference"][pair] = hook_reference_run(opt_name, setup, rank, world, batches)
        if rank == 0:
            print(f"[zero_training_check] reference {pair}: {json.dumps(report['reference'][pair])}", flush=True)
    if args.sparse:
        for st in args.sparse_stages.split(","):
            key = "sparse_zero3" if st == "3" else f"sparse_{st}"
            report[key] = sparse_zero3(rank, world, batches, os.path.dirname(os.path.abspath(args.out)), st)
        if rank == 0:
            print(f"[zero_training_check] sparse: {json.dumps({k: v for k, v in report.items() if 'sparse' in k})}", flush=True)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
