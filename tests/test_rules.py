import pytest
import torch.nn as nn

from gps_ds.config import RuleOverrides
from gps_ds.models import create_model
from gps_ds.models.sam import build_small_sam
from gps_ds.rules import RuleError, classify, trainable_names


def _linear_conv_weights(model: nn.Module) -> set[str]:
    out = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            out.add(f"{mod_name}.weight")
    return out


def test_vit_rules():
    model = create_model("test_vit", 5)
    roles = classify(model)
    assert roles.family == "vit"
    head = {"head.weight", "head.bias"}
    assert set(roles.candidates) == _linear_conv_weights(model) - head
    assert "patch_embed.proj.weight" in roles.candidates
    for name in ("pos_embed", "cls_token", "norm.weight", "norm.bias", "blocks.0.norm1.weight", "blocks.0.norm1.bias"):
        assert roles.roles[name] == "frozen", name
    assert set(roles.head) == head
    assert roles.roles["blocks.0.attn.qkv.bias"] == "whole"
    # Every parameter has exactly one role.
    assert list(roles.roles) == [n for n, _ in model.named_parameters()]


def test_swin_rules():
    model = create_model("swin_tiny_patch4_window7_224", 5, device="meta")
    roles = classify(model)
    assert roles.family == "swin"
    assert roles.roles["layers.0.blocks.0.attn.relative_position_bias_table"] == "frozen"
    assert roles.roles["layers.1.downsample.reduction.weight"] == "candidate"
    assert roles.roles["layers.1.downsample.norm.weight"] == "frozen"
    assert set(roles.head) == {"head.fc.weight", "head.fc.bias"}


def test_convnext_rules():
    model = create_model("test_convnext", 5)
    roles = classify(model)
    assert roles.family == "convnext"
    assert roles.roles["stem.0.weight"] == "candidate"
    assert roles.roles["stem.1.weight"] == "frozen"  # LayerNorm2d
    assert roles.roles["stages.0.blocks.0.conv_dw.weight"] == "candidate"  # depthwise 7x7
    assert roles.roles["stages.0.blocks.0.gamma"] == "whole"  # layer scale
    assert roles.roles["stages.1.downsample.1.weight"] == "candidate"
    assert roles.roles["head.norm.weight"] == "frozen"
    assert set(roles.head) == {"head.fc.weight", "head.fc.bias"}


def test_sam_rules():
    roles = classify(build_small_sam())
    assert roles.family == "sam"
    r = roles.roles
    assert r["image_encoder.blocks.0.attn.qkv.weight"] == "candidate"
    assert r["image_encoder.patch_embed.proj.weight"] == "candidate"
    assert r["image_encoder.neck.0.weight"] == "candidate"
    assert r["image_encoder.blocks.0.attn.qkv.bias"] == "whole"
    for name in ("image_encoder.pos_embed", "image_encoder.blocks.0.attn.rel_pos_h",
                 "image_encoder.blocks.0.norm1.weight", "image_encoder.neck.1.weight",
                 "prompt_encoder.point_embeddings.0.weight"):
        assert r[name] == "frozen", name
    assert r["prompt_encoder.no_mask_embed.weight"] == "whole"
    unused = ("mask_decoder.iou_prediction_head.", "mask_decoder.output_hypernetworks_mlps.1.",
              "mask_decoder.output_hypernetworks_mlps.2.", "mask_decoder.output_hypernetworks_mlps.3.")
    assert all(role == ("frozen" if n.startswith(unused) else "whole")
               for n, role in r.items() if n.startswith("mask_decoder."))
    assert not any(n.startswith(("mask_decoder.", "prompt_encoder.")) for n in roles.candidates)


def test_overrides_order_and_errors():
    model = create_model("test_vit", 5)
    roles = classify(model, overrides=RuleOverrides(frozen=["blocks.0.*"], whole=["blocks.1.attn.qkv.weight", "blocks.0.attn.qkv.weight"]))
    assert roles.roles["blocks.0.attn.qkv.weight"] == "frozen"  # frozen checked first
    assert roles.roles["blocks.0.attn.qkv.bias"] == "frozen"
    assert roles.roles["blocks.1.attn.qkv.weight"] == "whole"
    with pytest.raises(RuleError, match="blocks.0.norm1.weight"):
        classify(model, overrides=RuleOverrides(candidate=["blocks.0.norm1.weight"]))


def test_method_trainables():
    model = create_model("test_vit", 5)
    roles = classify(model)
    assert trainable_names(roles, "linear") == ["head.weight", "head.bias"]
    bitfit = set(trainable_names(roles, "bitfit"))
    assert bitfit == {n for n, _ in model.named_parameters() if n.endswith("bias")} | {"head.weight"}
    assert set(trainable_names(roles, "full")) == {n for n, _ in model.named_parameters()}
    assert trainable_names(roles, "lora") == ["head.weight", "head.bias"]  # + the LoRA factors it adds
    with pytest.raises(RuleError):
        trainable_names(roles, "no-such-method")
