"""The PEFT baselines as `train.method` (lora, adapter, vpt-shallow, vpt-deep, ssf), each checked
against an independent computation: the engine's base weights against a freshly built model, the
trained model's outputs against a hand-written forward of the base model + the delta's tensors, and
(lora, ssf) the merged plain timm checkpoint against the trained model and against PEFT's own merge."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gps_ds.cli import run
from gps_ds.config import validate_config
from gps_ds.delta import load_delta
from gps_ds.engine import Trainer
from gps_ds.methods import MethodError, get_method
from gps_ds.models import create_model
from gps_ds.rules import classify
from gps_ds.seeding import seed_everything
from gps_ds.weights import save_state_dict

METHODS = ["lora", "adapter", "vpt-shallow", "vpt-deep", "ssf"]
DEPTH, DIM, CLASSES = 6, 64, 10  # timm's test_vit


def make_cfg(digits, out, method: str, options: dict | None = None):
    return validate_config({
        "model": {"name": "test_vit", "img_size": 32, "num_classes": CLASSES},
        "data": {"train": str(digits), "test": str(digits), "recipe": "digits", "image_size": 32, "workers": 0,
                 "steps_per_epoch": 3},
        "train": {"method": method, "method_options": options or {}, "epochs": 2, "lr": 3e-3, "optimizer": "adam",
                  "weight_decay": 0.0},
        "deepspeed": {"train_micro_batch_size_per_gpu": 32},
        "output": {"dir": str(out)},
    })


def fresh_model(cfg):
    """The run's initial base model, built independently of the trainer (same seed, same factory)."""
    from gps_ds.models import create_model_from_config

    seed_everything(cfg.train.seed)
    return create_model_from_config(cfg).eval()


def a_batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def warm_backbone(digits, tmp_path_factory):
    """test_vit briefly trained in full on the digits (a random ViT's features barely depend on the
    input): the methods start from it, as from a pre-trained backbone."""
    from gps_ds.delta import merge_state_dict

    out = tmp_path_factory.mktemp("warm")
    cfg = make_cfg(digits, out / "run", "full")
    cfg.train.epochs, cfg.train.lr, cfg.data.steps_per_epoch = 3, 1e-3, 4
    Trainer(cfg, show_progress=False).run()
    path = out / "warm.safetensors"
    save_state_dict(merge_state_dict(fresh_model(cfg).state_dict(), load_delta(out / "run" / "delta_last.safetensors")),
                    path)
    return path


LR = {"lora": 3e-3, "adapter": 3e-3, "ssf": 3e-3, "vpt-shallow": 1e-2, "vpt-deep": 1e-2}


@pytest.fixture(scope="module", params=METHODS)
def trained(request, digits, warm_backbone, tmp_path_factory):
    """One short trainer run per method (2 epochs x 3 steps) from the warm backbone, shared below."""
    out = tmp_path_factory.mktemp(request.param)
    cfg = make_cfg(digits, out / "run", request.param)
    cfg.model.checkpoint, cfg.train.lr = str(warm_backbone), LR[request.param]
    trainer = Trainer(cfg, show_progress=False)
    summary = trainer.run()
    return {"method": request.param, "cfg": cfg, "out": out, "summary": summary,
            "model": trainer.engine.module.eval(), "delta": load_delta(out / "run" / "delta_last.safetensors")}


def base_name(name: str) -> str:
    return name.replace(".base_layer.", ".")  # PEFT moves a target layer's own tensors under base_layer


def expected_new(method: str, init) -> dict[str, tuple[int, ...]]:
    """The new tensors each method must add, with their shapes, written out by hand for test_vit."""
    new: dict[str, tuple[int, ...]] = {}
    if method == "lora":
        for i in range(DEPTH):
            for layer, (out_f, in_f) in {"attn.qkv": (3 * DIM, DIM), "attn.proj": (DIM, DIM),
                                         "mlp.fc1": (3 * DIM, DIM), "mlp.fc2": (DIM, 3 * DIM)}.items():
                new[f"blocks.{i}.{layer}.lora_A.default.weight"] = (8, in_f)
                new[f"blocks.{i}.{layer}.lora_B.default.weight"] = (out_f, 8)
    elif method == "adapter":
        for i in range(DEPTH):
            for slot in ("drop_path1", "drop_path2"):
                p = f"blocks.{i}.{slot}.adapter"
                new.update({f"{p}.down.weight": (8, DIM), f"{p}.down.bias": (8,), f"{p}.up.weight": (DIM, 8),
                            f"{p}.up.bias": (DIM,)})
    elif method.startswith("vpt"):
        new["blocks.prompts"] = (DEPTH if method == "vpt-deep" else 1, 10, DIM)
    elif method == "ssf":
        for mod_name, mod in init.named_modules():
            if mod_name != "head" and isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm)):
                c = mod.normalized_shape[0] if isinstance(mod, torch.nn.LayerNorm) else mod.weight.shape[0]
                new[f"{mod_name}.ssf_scale"] = new[f"{mod_name}.ssf_shift"] = (c,)
    return new


def test_only_its_parameters_train(trained):
    """Read from the engine's own model: every base tensor except the head is bit-identical to a
    freshly built model; the head and every new tensor of the method moved; nothing else trains."""
    method, model = trained["method"], trained["model"]
    init = fresh_model(trained["cfg"])
    head = classify(init).head
    before = dict(init.named_parameters())
    after = {base_name(n): p.detach() for n, p in model.named_parameters()}
    new = {n: tuple(p.shape) for n, p in after.items() if n not in before}
    assert new == expected_new(method, init)
    assert set(before) <= set(after)
    changed_base = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed_base == set(head)
    # Every new tensor trained (none stayed at its initial value: zeros / ones / the prompt init).
    for n in new:
        if n.endswith(("lora_B.default.weight", "up.weight", "up.bias", "ssf_shift")):
            assert after[n].abs().max() > 0, n
        elif n.endswith("ssf_scale"):
            assert not torch.equal(after[n], torch.ones_like(after[n])), n
    trainable = {base_name(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(new) | set(head)
    delta = trained["delta"]
    assert set(delta.whole) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not delta.selected and trained["summary"]["trainable"]["total"] == delta.num_whole()
    assert delta.meta["method"] == method


def test_training_learned(trained):
    """Test top-1 rose well above the warm starting model's (41% on these digits)."""
    from gps_ds.data.loaders import make_eval_loader
    from gps_ds.evaluation import evaluate

    cfg = trained["cfg"]
    from gps_ds.data.transforms import resolve_data

    model = fresh_model(cfg)  # evaluated with the data settings the trainer resolves from it
    start = evaluate(model, make_eval_loader(resolve_data(cfg.data, model), 0, 1, batch_size_per_rank=64), "cpu",
                     torch.float32).top1
    assert trained["summary"]["test"]["top1"] >= start + 5.0, (start, trained["summary"]["test"])


def test_eval_of_the_delta_reproduces_the_trainers_test_metric(trained, tmp_path, capsys):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(trained["cfg"].model_dump(mode="json")))
    capsys.readouterr()
    delta = trained["out"] / "run" / "delta_last.safetensors"
    assert run(["eval", "--config", str(cfg_path), "--delta", str(delta), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 450
    assert result["top1"] == pytest.approx(trained["summary"]["test"]["top1"])
    assert result["loss"] == pytest.approx(trained["summary"]["test"]["eval_loss"], rel=1e-5)


# -- hand-written reference forwards: the fresh base model's own timm layers + the delta's tensors ----------
def _tokens(base, x):
    return base._pos_embed(base.patch_embed(x))


def _logits(base, delta, h):
    return F.linear(base.norm(h)[:, 0], delta.whole["head.weight"], delta.whole["head.bias"])


def reference_adapter(base, delta, x):
    def adapter(h, p):
        w = delta.whole
        return h + F.linear(F.gelu(F.linear(h, w[f"{p}.down.weight"], w[f"{p}.down.bias"])),
                            w[f"{p}.up.weight"], w[f"{p}.up.bias"])

    h = _tokens(base, x)
    for i, blk in enumerate(base.blocks):
        h = h + adapter(blk.attn(blk.norm1(h)), f"blocks.{i}.drop_path1.adapter")
        h = h + adapter(blk.mlp(blk.norm2(h)), f"blocks.{i}.drop_path2.adapter")
    return _logits(base, delta, h)


def reference_vpt(base, delta, x, deep: bool):
    prompts = delta.whole["blocks.prompts"]
    tokens = prompts.shape[1]
    h = _tokens(base, x)
    for i, blk in enumerate(base.blocks):
        if i == 0:  # after the class token, in front of the patch tokens
            h = torch.cat([h[:, :1], prompts[0].expand(h.shape[0], -1, -1), h[:, 1:]], dim=1)
        elif deep:  # this block's own prompts replace the previous block's output at those positions
            h = h.clone()
            h[:, 1:1 + tokens] = prompts[i]
        h = blk(h)
    return _logits(base, delta, h)


def reference_lora(base, delta, x, scaling: float = 16 / 8):
    """Base weights W + scaling * B A written into a fresh model by hand."""
    model = base
    with torch.no_grad():
        for name, p in model.named_parameters():
            layer = name[: -len(".weight")]
            a = delta.whole.get(f"{layer}.lora_A.default.weight")
            if a is not None:
                p += scaling * delta.whole[f"{layer}.lora_B.default.weight"] @ a
        model.head.weight.copy_(delta.whole["head.weight"])
        model.head.bias.copy_(delta.whole["head.bias"])
    return model(x)


def reference_ssf(base, delta, x):
    """The base model with y -> gamma * y + beta written after each layer by explicit hooks."""
    w = delta.whole
    for mod_name, mod in base.named_modules():
        if f"{mod_name}.ssf_scale" in w:
            g, b = w[f"{mod_name}.ssf_scale"], w[f"{mod_name}.ssf_shift"]
            shape = (-1, 1, 1) if isinstance(mod, torch.nn.Conv2d) else (-1,)
            mod.register_forward_hook(lambda m, i, o, g=g, b=b, s=shape: o * g.view(s) + b.view(s))
    with torch.no_grad():
        base.head.weight.copy_(w["head.weight"])
        base.head.bias.copy_(w["head.bias"])
    return base(x)


@torch.no_grad()
def test_trained_model_equals_a_hand_written_forward(trained):
    method, delta = trained["method"], trained["delta"]
    base = fresh_model(trained["cfg"])
    x = a_batch()
    if method == "adapter":
        ref = reference_adapter(base, delta, x)
    elif method.startswith("vpt"):
        ref = reference_vpt(base, delta, x, deep=method == "vpt-deep")
    elif method == "lora":
        ref = reference_lora(base, delta, x)
    else:
        ref = reference_ssf(base, delta, x)
    out = trained["model"](x)
    assert not torch.allclose(out, fresh_model(trained["cfg"])(x), atol=1e-3)  # training changed the outputs
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_merge_gives_a_plain_model_with_the_trained_outputs(trained, tmp_path, capsys):
    """`gps-ds delta merge`: lora and ssf give a plain timm checkpoint (strict load) that computes the
    trained model's outputs; adapter and vpt refuse in one line naming the method."""
    method = trained["method"]
    base_path, merged = tmp_path / "base.safetensors", tmp_path / "merged.safetensors"
    save_state_dict(fresh_model(trained["cfg"]).state_dict(), base_path)
    delta = trained["out"] / "run" / "delta_last.safetensors"
    capsys.readouterr()
    code = run(["delta", "merge", "--delta", str(delta), "--base", str(base_path), "--out", str(merged)])
    if not get_method(method).mergeable:
        err = capsys.readouterr().err.strip()
        assert code == 2 and f"'{method}' delta cannot be merged" in err and len(err.splitlines()) == 1
        return
    assert code == 0
    from safetensors.torch import load_file

    plain = create_model("test_vit", CLASSES, img_size=32).eval()
    plain.load_state_dict(load_file(str(merged)))  # strict: exactly the base architecture's tensors
    with torch.no_grad():
        torch.testing.assert_close(plain(a_batch(1)), trained["model"](a_batch(1)), atol=2e-5, rtol=1e-5)


def test_lora_merge_matches_peft_and_a_hand_computation():
    """Our merge against PEFT's merge_and_unload on the same (perturbed) factors (Linear and a 16x16
    Conv2d), the merged plain model against the LoRA model, and one layer's LoRA output against
    x W^T + b + (alpha / r) x A^T B^T computed by hand; r and alpha as options."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = create_model("test_vit", 5, img_size=32).eval()
    state = {n: t.clone() for n, t in model.state_dict().items()}
    roles = classify(model)
    method = get_method("lora", {"r": 4, "alpha": 12,
                                 "targets": ["blocks.*.attn.qkv", "blocks.*.mlp.fc2", "patch_embed.proj"]})
    prepared = method.prepare(model, roles)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    delta = method.extract(model, prepared, {})
    ours = method.merge(state, delta, roles.head)

    layer = model.blocks[1].attn.qkv
    x = torch.randn(3, 64)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        hand = F.linear(x, state["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.bias"]) + 3.0 * (x @ a.T) @ b.T
        torch.testing.assert_close(layer(x), hand, atol=1e-5, rtol=1e-5)

    # PEFT's own merge of the same factors in a separately built PeftModel.
    twin = create_model("test_vit", 5, img_size=32).eval()
    twin.load_state_dict(state)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=r".*(blocks\.\d+\.(attn\.qkv|mlp\.fc2)|patch_embed\.proj)")
    peft_model = get_peft_model(twin, config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(delta.whole[n.removeprefix("base_model.model.")])
            if n.endswith(("head.weight", "head.bias")):
                p.copy_(delta.whole[n.split("model.", 2)[-1]])
    peft_state = peft_model.merge_and_unload().state_dict()
    assert set(ours) == set(peft_state) == set(state)
    for n in state:
        torch.testing.assert_close(ours[n], peft_state[n], atol=1e-6, rtol=1e-6)
    changed = {n for n in state if not torch.equal(ours[n], state[n])}
    assert changed == {f"blocks.{i}.{l}.weight" for i in range(DEPTH) for l in ("attn.qkv", "mlp.fc2")} | {
        "head.weight", "head.bias", "patch_embed.proj.weight"}  # a 16x16 Conv2d too
    plain = create_model("test_vit", 5, img_size=32).eval()
    plain.load_state_dict(ours)
    with torch.no_grad():
        torch.testing.assert_close(plain(a_batch()), model(a_batch()), atol=2e-5, rtol=1e-5)


def test_ssf_merge_is_exact_on_a_convnext():
    """Channels-first layers (Conv2d, LayerNorm2d) and channels-last ones (LayerNorm, Linear) of a
    ConvNeXt: random gamma / beta folded into the weights give the wrapped model's outputs."""
    torch.manual_seed(0)
    model = create_model("test_convnext", 5).eval()
    state = {n: t.clone() for n, t in model.state_dict().items()}
    roles = classify(model)
    method = get_method("ssf")
    prepared = method.prepare(model, roles)
    kinds = {type(m).__name__ for n, m in model.named_modules() if hasattr(m, "ssf_scale")}
    assert {"Conv2d", "LayerNorm2d", "Linear"} <= kinds
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("ssf_scale"):
                p.uniform_(0.5, 1.5)
            elif n.endswith("ssf_shift"):
                p.normal_(0, 0.1)
    x = torch.randn(2, 3, 32, 32)
    plain = create_model("test_convnext", 5).eval()
    plain.load_state_dict(method.merge(state, method.extract(model, prepared, {}), roles.head))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-4, rtol=1e-4)


def _tiny_swin():
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 1),
                           num_classes=3).eval()


def test_adapter_and_lora_on_swin_start_at_the_base_model():
    x = torch.randn(2, 3, 32, 32)
    for name in ("adapter", "lora"):
        model = _tiny_swin()
        with torch.no_grad():
            ref = model(x)
        roles = classify(model)
        assert roles.family == "swin"
        prepared = get_method(name).prepare(model, roles)
        assert len(prepared.whole) == (2 * 2 * 4 if name == "adapter" else 2 * 4 * 2) + 2
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref)  # zero-initialised up-projection / B
            for n, p in model.named_parameters():
                if n.endswith(("up.weight", "lora_B.default.weight")):
                    p.normal_(0, 0.1)
            assert not torch.allclose(model(x), ref, atol=1e-4)  # and the new layers are on the path


def test_user_mistakes_are_one_line_errors(digits, tmp_path):
    with pytest.raises(MethodError, match=r"^train\.method_options\.rank: unknown option \(method 'lora'\)$"):
        get_method("lora", {"rank": 4})
    with pytest.raises(MethodError, match=r"^train\.method_options\.dim: .*method 'adapter'"):
        get_method("adapter", {"dim": 0})
    with pytest.raises(MethodError, match=r"^train\.method_options\.prompts: unknown option"):
        get_method("vpt-deep", {"prompts": 5})
    with pytest.raises(MethodError, match=r"^train\.method_options\.scale: unknown option \(method 'ssf'\)"):
        get_method("ssf", {"scale": 1})
    with pytest.raises(ValueError, match=r"train\.method_options\.r: "):
        make_cfg(digits, tmp_path, "lora", {"r": 0})

    convnext = create_model("test_convnext", 5)
    for name in ("adapter", "vpt-shallow", "vpt-deep"):
        with pytest.raises(MethodError, match=rf"^train\.method '{name}' supports model families .*'convnext'"):
            get_method(name).prepare(convnext, classify(convnext))
    with pytest.raises(MethodError, match=r"^train\.method 'vpt-deep' supports model families vit; .*'swin'"):
        get_method("vpt-deep").prepare(_tiny_swin(), classify(_tiny_swin()))
    vit = create_model("test_vit", 5, img_size=32, kwargs={"global_pool": "avg"})
    with pytest.raises(MethodError, match=r"needs a ViT whose head reads the class token"):
        get_method("vpt-shallow").prepare(vit, classify(vit))
    vit = create_model("test_vit", 5, img_size=32)
    with pytest.raises(MethodError, match=r"^train\.method_options\.targets: '\*\.nope' matches no module"):
        get_method("lora", {"targets": ["*.nope"]}).prepare(vit, classify(vit))
    with pytest.raises(MethodError, match=r"^train\.method_options\.targets: 'blocks\.0\.norm1' matches"):
        get_method("lora", {"targets": ["blocks.0.norm1"]}).prepare(vit, classify(vit))
    # Every new method is a valid train.method of the config.
    for name in METHODS:
        assert make_cfg(digits, tmp_path, name).train.method == name


def test_counts_without_data_match_the_hand_written_shapes():
    """`gps-ds count` (meta-device model): each new method's total = its new tensors (shapes written
    out by hand above) + the head; lora's default targets also fit a ConvNeXt (its MLP layers)."""
    import math

    from gps_ds.count import count_parameters

    model = create_model("test_vit", CLASSES, img_size=32, device="meta")
    counts = count_parameters(model, classify(model), 1)
    head = DIM * CLASSES + CLASSES
    for name in METHODS:
        assert counts[name]["total"] == sum(math.prod(s) for s in expected_new(name, model).values()) + head, name
    convnext = create_model("test_convnext", 5, device="meta")
    counts = count_parameters(convnext, classify(convnext), 1)
    assert "adapter" not in counts and "vpt-deep" not in counts  # families they refuse
    fcs = [m for n, m in convnext.named_modules() if n.endswith(("mlp.fc1", "mlp.fc2"))]
    assert fcs and counts["lora"]["total"] == sum(8 * (m.in_features + m.out_features) for m in fcs) + 5 * 64 + 5


@pytest.mark.parametrize("method", METHODS)
def test_new_parameters_follow_the_weights_device_and_dtype(method):
    """A bf16 model gets bf16 method parameters (and runs); a meta-device model gets meta ones."""
    model = create_model("test_vit", 5, img_size=32).to(torch.bfloat16)
    prepared = get_method(method).prepare(model, classify(model))
    params = dict(model.named_parameters())
    assert {params[n].dtype for n in prepared.whole} == {torch.bfloat16}
    with torch.no_grad():
        assert model(a_batch().to(torch.bfloat16)).dtype == torch.bfloat16
    model = create_model("test_vit", 5, img_size=32, device="meta")
    prepared = get_method(method).prepare(model, classify(model))
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_vpt_with_gradient_checkpointing_computes_the_same(method):
    """model.grad_checkpointing: timm's checkpoint_seq would skip the prompts; the prompted blocks
    checkpoint themselves, so outputs and prompt gradients equal those of the plain run."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = create_model("test_vit", 5, img_size=32, grad_checkpointing=checkpointing).eval()
        get_method(method).prepare(model, classify(model))
        out = model(a_batch())
        out.square().sum().backward()
        results.append((out.detach(), model.blocks.prompts.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
    assert results[0][1].abs().sum() > 0


@pytest.mark.parametrize("method", ["lora", "ssf"])  # PEFT-replaced layers; hooks + parameters on base layers
def test_zero3_run_saves_full_tensors_and_evaluates_the_same(digits, warm_backbone, tmp_path, capsys, method):
    """ZeRO-3 (one process; the new modules are attached before DeepSpeed partitions the model):
    the delta holds the full tensors (PEFT adapters saved under ZeRO-3 have come out empty
    elsewhere) and `gps-ds eval` of it reproduces the run's test metric."""
    cfg = make_cfg(digits, tmp_path / "run", method)
    cfg.model.checkpoint, cfg.train.lr = str(warm_backbone), LR[method]
    cfg.deepspeed["zero_optimization"] = {"stage": 3}
    summary = Trainer(cfg, show_progress=False).run()
    delta = load_delta(tmp_path / "run" / "delta_last.safetensors")
    init = fresh_model(cfg)
    shapes = {n: tuple(t.shape) for n, t in delta.whole.items() if n not in classify(init).head}
    assert shapes == expected_new(method, init)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    capsys.readouterr()
    assert run(["eval", "--config", str(cfg_path), "--delta", str(tmp_path / "run" / "delta_last.safetensors"),
                "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(summary["test"]["top1"])
    assert result["loss"] == pytest.approx(summary["test"]["eval_loss"], rel=1e-5)


def test_ssf_merge_is_exact_for_layers_without_bias():
    """A layer without a bias (qkv_bias=False ViT; Swin's patch-merging reduction) gets a scale only,
    so the merged plain model still equals the wrapped one; a base checkpoint lacking a tensor the
    delta folds into is refused in one line."""
    def wrapped(model):
        state = {n: t.clone() for n, t in model.state_dict().items()}
        roles = classify(model)
        method = get_method("ssf")
        prepared = method.prepare(model, roles)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(("ssf_scale", "ssf_shift")):
                    p.uniform_(0.5, 1.5) if n.endswith("scale") else p.normal_(0, 0.1)
        return state, method, method.extract(model, prepared, {}), roles

    torch.manual_seed(0)
    vit = create_model("test_vit", 5, img_size=32, kwargs={"qkv_bias": False}).eval()
    state, method, delta, roles = wrapped(vit)
    assert "blocks.0.attn.qkv.ssf_scale" in delta.whole and "blocks.0.attn.qkv.ssf_shift" not in delta.whole
    assert "blocks.0.attn.proj.ssf_shift" in delta.whole
    plain = create_model("test_vit", 5, img_size=32, kwargs={"qkv_bias": False}).eval()
    plain.load_state_dict(method.merge(state, delta, roles.head))
    with torch.no_grad():
        torch.testing.assert_close(plain(a_batch()), vit(a_batch()), atol=1e-5, rtol=1e-5)

    swin = _tiny_swin()
    state, method, delta, roles = wrapped(swin)
    assert "layers.1.downsample.reduction.ssf_scale" in delta.whole
    assert "layers.1.downsample.reduction.ssf_shift" not in delta.whole
    plain = _tiny_swin()
    plain.load_state_dict(method.merge(state, delta, roles.head))
    with torch.no_grad():
        torch.testing.assert_close(plain(a_batch()), swin(a_batch()), atol=1e-5, rtol=1e-5)

    state, method, delta, roles = wrapped(create_model("test_vit", 5, img_size=32))
    del state["blocks.0.attn.proj.bias"]
    with pytest.raises(MethodError, match=r"^ssf merge: 'blocks\.0\.attn\.proj' has no 'bias' in the base checkpoint"):
        method.merge(state, delta, roles.head)


@pytest.mark.parametrize("method", ["lora", "vpt-deep"])
def test_best_delta_is_written_back_for_the_single_test_pass(digits, warm_backbone, tmp_path, capsys, method):
    """With a validation split the trainer writes the best epoch's delta back into its wrapped model
    (`load_trained`) for the one test pass; `gps-ds eval` of delta_best gives the same numbers."""
    cfg = make_cfg(digits, tmp_path / "run", method)
    cfg.model.checkpoint, cfg.train.lr = str(warm_backbone), LR[method]
    cfg.data.val, cfg.data.val_split = str(digits), "test"  # a stand-in validation split (450 images)
    summary = Trainer(cfg, show_progress=False).run()
    assert summary["select_on"] == "val" and summary["delta"].endswith("delta_best.safetensors")
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    capsys.readouterr()
    assert run(["eval", "--config", str(cfg_path), "--delta", summary["delta"], "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(summary["test"]["top1"])
    assert result["loss"] == pytest.approx(summary["test"]["eval_loss"], rel=1e-5)
