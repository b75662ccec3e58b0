"""SamSegmenter against segment-anything's own modules, SAM checkpoints, boxes_from_masks."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything import sam_model_registry

from gps_ds.config import validate_config
from gps_ds.models import ModelError, SamSegmenter, boxes_from_masks, create_model, create_model_from_config
from gps_ds.weights import save_state_dict

S = 64  # sam_small's default image size: a 4x4 embedding grid, 16x16 low-res masks
BOXES = torch.tensor([[4.0, 5.0, 30.0, 40.0], [0.0, 0.0, 63.0, 63.0], [10.5, 12.0, 20.0, 50.0]])


def small_sam(seed: int = 0, **kwargs) -> SamSegmenter:
    """sam_small whose zero-initialised tensors (pos_embed, rel_pos tables) are made random, so
    that a wrong position path changes the output."""
    torch.manual_seed(seed)
    model = create_model("sam_small", 0, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.5)
    return model


def reference_logits(model: SamSegmenter, images: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
    """Upstream modules, one image at a time, as Sam.forward chains them (minus its no_grad)."""
    out = []
    for i in range(images.shape[0]):
        embedding = model.image_encoder(images[i : i + 1])
        sparse, dense = model.prompt_encoder(points=None, boxes=None if boxes is None else boxes[i : i + 1], masks=None)
        low_res, _ = model.mask_decoder(
            image_embeddings=embedding, image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
        out.append(F.interpolate(low_res, (images.shape[-2], images.shape[-1]), mode="bilinear", align_corners=False))
    return torch.cat(out)


def images(batch: int = 3, size: int = S, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("with_boxes", [False, True])
def test_batched_forward_equals_upstream_per_image(with_boxes):
    model = small_sam()
    x, boxes = images(), BOXES if with_boxes else None
    with torch.no_grad():
        got = model(x, boxes)
        want = reference_logits(model, x, boxes)
    assert got.shape == (3, 1, S, S)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # images are not mixed up or broadcast


def _grads(model: nn.Module, x: torch.Tensor, boxes=None, reference: bool = False) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = reference_logits(model, x, boxes) if reference else model(x, boxes)
    target = (torch.arange(logits.numel()).reshape(logits.shape) % 3 == 0).float()
    F.binary_cross_entropy_with_logits(logits, target).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("with_boxes", [False, True])
def test_gradients_equal_upstream_and_reach_encoder_decoder_no_mask_embed(with_boxes):
    model = small_sam()
    x, boxes = images(), BOXES if with_boxes else None
    got = _grads(model, x, boxes)
    want = _grads(model, x, boxes, reference=True)
    for name in ("image_encoder.patch_embed.proj.weight", "image_encoder.blocks.0.attn.qkv.weight",
                 "image_encoder.blocks.1.attn.rel_pos_h", "image_encoder.neck.0.weight",
                 "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight",
                 "mask_decoder.output_upscaling.0.weight", "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight",
                 "mask_decoder.mask_tokens.weight", "prompt_encoder.no_mask_embed.weight"):
        assert name in got and got[name].abs().sum() > 0, name
    # With multimask_output=False only mask token 0's hypernetwork (and no IoU head) feeds the
    # output: upstream gives the others zero gradients, the batched path none at all.
    assert set(got) <= set(want)
    for name in want:
        torch.testing.assert_close(got.get(name, torch.zeros_like(want[name])), want[name],
                                   rtol=1e-4, atol=1e-6, msg=name)


def test_forward_works_in_bf16_with_fp32_positional_encoding():
    # DeepSpeed casts the whole module (buffers too) to bf16; upstream's PromptEncoder then fails
    # on a dtype mismatch in its positional encoding.
    model = small_sam()
    x = images()
    with torch.no_grad():
        want = model(x, BOXES)
        got = model.to(torch.bfloat16)(x.bfloat16(), BOXES)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert torch.corrcoef(torch.stack([got.float().flatten(), want.flatten()]))[0, 1] > 0.99


def test_grad_checkpointing_gives_the_same_gradients_and_recomputes_blocks():
    model = small_sam(kwargs={"depth": 3, "global_attn_indexes": [2]})
    x = images(batch=2)
    plain = _grads(model, x, BOXES[:2])
    calls = []
    # A pre-hook: non-reentrant recomputation stops once the saved tensors are rebuilt, before
    # the block's forward returns.
    model.image_encoder.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model.set_grad_checkpointing(True)
    checkpointed = _grads(model, x, BOXES[:2])
    assert len(calls) == 2  # forward, then recomputed in backward
    assert set(plain) == set(checkpointed)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # no recomputation without autograd
        calls.clear()
        model(x)
        assert len(calls) == 1


def test_grad_checkpointing_flag_reaches_sam_and_timm_models():
    assert create_model("sam_small", 0, grad_checkpointing=True).grad_checkpointing is True
    assert create_model("sam_small", 0).grad_checkpointing is False
    assert create_model("test_vit", 3, grad_checkpointing=True).grad_checkpointing is True
    assert create_model("test_vit", 3).grad_checkpointing is False
    cfg = validate_config({"model": {"name": "sam_small", "grad_checkpointing": True, "img_size": 32,
                                     "kwargs": {"embed_dim": 16, "prompt_dim": 16}}})
    model = create_model_from_config(cfg)
    assert isinstance(model, SamSegmenter) and model.grad_checkpointing and model.img_size == 32
    assert model.image_encoder.patch_embed.proj.out_channels == 16 and cfg.model.num_classes == 1


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip_loads_strictly_and_reproduces_outputs(tmp_path, suffix):
    source = small_sam(seed=3)
    path = tmp_path / f"sam{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)  # the official SAM files are plain state dicts like this
    else:
        save_state_dict(source.state_dict(), path)
    torch.manual_seed(99)
    loaded = create_model("sam_small", 0, checkpoint=str(path), pretrained=True)
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, BOXES), source(x, BOXES), rtol=0, atol=0)


def _one_line_error(match: str, **kwargs) -> str:
    with pytest.raises(ModelError, match=match) as info:
        create_model("sam_small", 0, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_checkpoints_are_one_line_errors_naming_file_and_key(tmp_path):
    state = small_sam().state_dict()
    good_pth, good_st = tmp_path / "good.pth", tmp_path / "good.safetensors"
    torch.save(state, good_pth)
    save_state_dict(state, good_st)
    for good in (good_pth, good_st):
        truncated = tmp_path / f"truncated{good.suffix}"
        truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        _one_line_error(f"model.checkpoint.*{truncated}", checkpoint=str(truncated))

    renamed = dict(state)
    renamed["image_encoder.blocks.0.attn.qkv.weight_renamed"] = renamed.pop("image_encoder.blocks.0.attn.qkv.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    msg = _one_line_error("'image_encoder.blocks.0.attn.qkv.weight' is missing",
                          checkpoint=str(tmp_path / "renamed.pth"))
    assert str(tmp_path / "renamed.pth") in msg

    extra = dict(state, **{"mask_decoder.extra": torch.zeros(1)})
    save_state_dict(extra, tmp_path / "extra.safetensors")
    _one_line_error("'mask_decoder.extra' is not a parameter", checkpoint=str(tmp_path / "extra.safetensors"))

    reshaped = dict(state, **{"mask_decoder.iou_token.weight": torch.zeros(1, 8)})
    torch.save(reshaped, tmp_path / "reshaped.pth")
    _one_line_error(f"{tmp_path / 'reshaped.pth'}.*'mask_decoder.iou_token.weight' has shape \\[1, 8\\]",
                    checkpoint=str(tmp_path / "reshaped.pth"))

    _one_line_error("model.checkpoint: file not found", checkpoint=str(tmp_path / "none.pth"))
    _one_line_error("SAM weights come only from model.checkpoint", pretrained=True)
    _one_line_error("model.kwargs.depht", kwargs={"depht": 3})
    with pytest.raises(ModelError, match="model.kwargs.embed_dim is not used by sam_vit_b"):
        create_model("sam_vit_b", 0, kwargs={"embed_dim": 8}, device="meta")


@pytest.mark.parametrize("new_size", [32, 96])
def test_checkpoint_from_another_image_size_resizes_position_tables(tmp_path, new_size):
    from timm.layers import resample_abs_pos_embed_nhwc

    source = small_sam(seed=5)  # 64 px: 4x4 grid; block 1 is global (rel_pos of 7 rows), block 0 windowed
    torch.save(source.state_dict(), tmp_path / "sam64.pth")
    model = create_model("sam_small", 0, img_size=new_size, checkpoint=str(tmp_path / "sam64.pth"))
    grid = new_size // 16
    src_state = source.state_dict()

    # pos_embed: as timm resamples ViT position embeddings.
    want_pos = resample_abs_pos_embed_nhwc(src_state["image_encoder.pos_embed"], [grid, grid])
    torch.testing.assert_close(model.image_encoder.pos_embed.detach(), want_pos)
    assert model.image_encoder.blocks[1].attn.rel_pos_h.shape == (2 * grid - 1, 16)
    assert torch.equal(model.image_encoder.blocks[0].attn.rel_pos_h, src_state["image_encoder.blocks.0.attn.rel_pos_h"])

    # rel_pos: segment-anything itself resamples a table of the wrong length on the fly; a model
    # holding the original 7-row tables must give the same output as ours with resized tables.
    reference = create_model("sam_small", 0, img_size=new_size)
    fitted = {k: v for k, v in src_state.items() if "blocks.1.attn.rel_pos" not in k}
    fitted["image_encoder.pos_embed"] = want_pos
    reference.load_state_dict(fitted, strict=False)
    attn = reference.image_encoder.blocks[1].attn
    attn.rel_pos_h = nn.Parameter(src_state["image_encoder.blocks.1.attn.rel_pos_h"].clone())
    attn.rel_pos_w = nn.Parameter(src_state["image_encoder.blocks.1.attn.rel_pos_w"].clone())
    x = images(batch=2, size=new_size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_sam_vit_b_has_upstream_names_shapes_and_count():
    meta = create_model("sam_vit_b", 10, device="meta")
    with torch.device("meta"):
        upstream = sam_model_registry["vit_b"]()
    ours = {n: tuple(p.shape) for n, p in meta.state_dict().items()}
    theirs = {n: tuple(p.shape) for n, p in upstream.state_dict().items()}
    assert list(ours) == list(theirs) and ours == theirs
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in upstream.parameters()) == 93_735_472
    assert all(p.is_meta for p in meta.parameters())
    assert "pixel_mean" not in ours and meta.pixel_mean.shape == (3, 1, 1)

    # Same layout at another size: only pos_embed and the global blocks' rel_pos tables change.
    model512 = create_model("sam_vit_b", 0, img_size=512, device="meta")
    meta512 = {n: tuple(p.shape) for n, p in model512.state_dict().items()}
    assert list(meta512) == list(theirs)
    changed = sorted(n for n in theirs if meta512[n] != theirs[n])
    assert changed == sorted(["image_encoder.pos_embed"] + [f"image_encoder.blocks.{i}.attn.rel_pos_{a}"
                                                            for i in (2, 5, 8, 11) for a in "hw"])


def test_sam_vit_b_state_dict_loads_strictly_into_the_registry_model():
    torch.manual_seed(0)
    ours = create_model("sam_vit_b", 0)
    upstream = sam_model_registry["vit_b"]()
    upstream.load_state_dict(ours.state_dict(), strict=True)
    for name, tensor in upstream.state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[name]), name
    torch.testing.assert_close(ours.pixel_mean, upstream.pixel_mean)
    torch.testing.assert_close(ours.pixel_std, upstream.pixel_std)
    assert ours.training


def test_meta_build_ignores_the_checkpoint_file(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"not a checkpoint")
    model = create_model("sam_small", 0, checkpoint=str(path), device="meta", kwargs={"depth": 4})
    assert all(p.is_meta for p in model.parameters()) and len(model.image_encoder.blocks) == 4


def test_forward_rejects_images_of_another_size():
    with pytest.raises(ModelError, match=r"model.img_size=64"):
        small_sam()(torch.zeros(1, 3, 32, 32))


def test_boxes_from_masks_exact_without_jitter():
    masks = torch.zeros(4, 1, 16, 20)
    masks[0, 0, 2:6, 3:10] = 1  # rows 2..5, cols 3..9
    masks[1, 0, 0, 19] = 1  # one pixel, top right
    masks[3, 0, 7, 1] = masks[3, 0, 12, 15] = 1  # two blobs: their joint extent
    got = boxes_from_masks(masks, jitter=0.0)
    want = torch.tensor([[3, 2, 9, 5], [19, 0, 19, 0], [0, 0, 19, 15], [1, 7, 15, 12]], dtype=torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_boxes_from_masks_jitter_is_bounded_clamped_and_seeded():
    masks = torch.zeros(3, 1, 200, 300)
    masks[0, 0, 50:100, 100:140] = 1  # 40 wide, 50 high: reach 0.3*side = 12 / 15 px
    masks[1, 0, 10:190, 20:280] = 1  # 260 x 180: 0.3*side exceeds max_shift, so 20 px
    masks[2, 0, 0:3, 0:4] = 1  # at the corner: clamped to the image
    exact = boxes_from_masks(masks, jitter=0.0)
    reach = torch.tensor([[12, 15, 12, 15], [20, 20, 20, 20], [1.2, 0.9, 1.2, 0.9]])
    draws = torch.stack([boxes_from_masks(masks, jitter=0.3, max_shift=20, generator=torch.Generator().manual_seed(i))
                         for i in range(200)])
    shift = (draws - exact).abs()
    assert (shift <= reach + 1e-4).all()
    assert (shift.amax(dim=0) > 0.8 * reach).all()  # the whole range is used, each side independently
    assert (draws >= 0).all() and (draws[..., 0::2] <= 299).all() and (draws[..., 1::2] <= 199).all()
    assert (draws[..., 2] >= draws[..., 0]).all() and (draws[..., 3] >= draws[..., 1]).all()
    again = boxes_from_masks(masks, jitter=0.3, max_shift=20, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again, draws[7])


def test_boxes_from_an_empty_mask_cover_the_image():
    got = boxes_from_masks(torch.zeros(2, 1, 10, 12), jitter=0.2, generator=torch.Generator().manual_seed(0))
    # The whole-image box has sides 12 and 10: jitter moves them inwards at most 2.4 / 2 px.
    assert (got[:, :2] <= torch.tensor([2.4, 2.0])).all() and (got[:, 2:] >= torch.tensor([11 - 2.4, 9 - 2.0])).all()
    torch.testing.assert_close(boxes_from_masks(torch.zeros(2, 1, 10, 12), jitter=0.0),
                               torch.tensor([[0.0, 0.0, 11.0, 9.0]] * 2))
