"""GPS parameter roles on SAM, against a listing written from REFERENCE.md ("SAM polyp"):
encoder Linear/Conv weights are candidates (K per neuron); encoder biases, the whole mask
decoder and the no-mask embedding are trained whole; norms, pos_embed, relative-position
tables and the rest of the prompt encoder are frozen. The decoder's IoU head and the
hypernetworks of mask tokens 1-3 are frozen too: single-mask output never uses them."""

import json
import re

import pytest
import torch.nn as nn

from gps_ds.cli import run
from gps_ds.count import count_parameters
from gps_ds.models import create_model
from gps_ds.rules import classify

# First match wins. Module paths are segment-anything's: ImageEncoderViT(patch_embed.proj,
# pos_embed, blocks.i.{norm1, attn.{qkv, proj, rel_pos_h, rel_pos_w}, norm2, mlp.{lin1, lin2}},
# neck = [Conv2d, LayerNorm2d, Conv2d, LayerNorm2d]).
EXPECTED = [
    (r"mask_decoder\.(iou_prediction_head|output_hypernetworks_mlps\.[1-9]\d*)\..+", "frozen"),
    (r"mask_decoder\..+", "whole"),
    (r"prompt_encoder\.no_mask_embed\.weight", "whole"),
    (r"prompt_encoder\..+", "frozen"),
    (r"image_encoder\.pos_embed", "frozen"),
    (r"image_encoder\.blocks\.\d+\.attn\.rel_pos_[hw]", "frozen"),
    (r"image_encoder\.blocks\.\d+\.norm[12]\.(weight|bias)", "frozen"),
    (r"image_encoder\.neck\.[13]\.(weight|bias)", "frozen"),
    (r"image_encoder\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.lin1|mlp\.lin2)\.weight", "candidate"),
    (r"image_encoder\.(patch_embed\.proj|neck\.0|neck\.2)\.weight", "candidate"),
    (r"image_encoder\.blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.lin1|mlp\.lin2)\.bias", "whole"),
    (r"image_encoder\.patch_embed\.proj\.bias", "whole"),
]


def expected_role(name: str) -> str:
    for pattern, role in EXPECTED:
        if re.fullmatch(pattern, name):
            return role
    raise AssertionError(f"no expected role written for {name}")


@pytest.mark.parametrize("name, kwargs", [
    ("sam_small", {}),
    ("sam_small", {"depth": 3, "global_attn_indexes": [0, 2], "decoder_depth": 2}),
    ("sam_vit_b", None),
])
def test_sam_roles_parameter_by_parameter(name, kwargs):
    model = create_model(name, 0, kwargs=kwargs, device="meta")
    roles = classify(model)
    assert roles.family == "sam"
    # Whether the mask decoder also counts as the "head" (for linear probing) is rules.py's choice;
    # it may be nothing else.
    assert all(n.startswith("mask_decoder.") for n in roles.head)
    assert list(roles.roles) == [n for n, _ in model.named_parameters()]
    wrong = {n: (r, expected_role(n)) for n, r in roles.roles.items() if r != expected_role(n)}
    assert not wrong, wrong
    assert {"candidate", "whole", "frozen"} == set(roles.roles.values())


def _encoder_rows(model: nn.Module) -> int:
    return sum(m.weight.shape[0] for m in model.image_encoder.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def test_sam_vit_b_k1_counts(capsys):
    model = create_model("sam_vit_b", 0, device="meta")
    rows = _encoder_rows(model)
    # By hand: 12 blocks x (qkv 2304 + proj 768 + lin1 3072 + lin2 768) + patch_embed 768 + neck 256 + 256.
    assert rows == 12 * (2304 + 768 + 3072 + 768) + 768 + 512 == 84_224
    unused = ("mask_decoder.iou_prediction_head.", "mask_decoder.output_hypernetworks_mlps.1.",
              "mask_decoder.output_hypernetworks_mlps.2.", "mask_decoder.output_hypernetworks_mlps.3.")
    whole = sum(p.numel() for n, p in model.named_parameters()
                if (n.startswith("mask_decoder.") and not n.startswith(unused))
                or n == "prompt_encoder.no_mask_embed.weight")
    whole += sum(m.bias.numel() for m in model.image_encoder.modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None)
    counts = count_parameters(model, classify(model), 1)
    assert counts["gps"]["selected"] == rows
    assert counts["gps"]["whole"] == whole
    assert counts["parameters"] == 93_735_472

    assert run(["count", "--model", "sam_vit_b", "--k", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "sam" and out["gps"]["selected"] == rows and out["gps"]["whole"] == whole
