import time

import pytest
import torch

from gps_ds.models import ModelError, create_model
from gps_ds.weights import save_state_dict


def test_pretrained_offline_without_weights_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelError, match="model.pretrained: no cached weights for 'vit_tiny_patch16_224.augreg_in21k'"):
        create_model("vit_tiny_patch16_224", 10, pretrained="augreg_in21k")
    assert time.perf_counter() - start < 10


def test_local_checkpoint_adapts_the_head(tmp_path):
    torch.manual_seed(0)
    source = create_model("test_vit", 7)
    ckpt = tmp_path / "backbone.safetensors"
    save_state_dict(source.state_dict(), ckpt)
    model = create_model("test_vit", 3, checkpoint=str(ckpt))
    assert model.head.weight.shape == (3, source.head.weight.shape[1])
    for name, p in source.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(model.state_dict()[name], p), name


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 50])
def test_missing_or_corrupt_checkpoint_is_one_clear_error(tmp_path, content):
    with pytest.raises(ModelError, match="model.checkpoint: file not found"):
        create_model("test_vit", 3, checkpoint=str(tmp_path / "none.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(ModelError, match=f"cannot load model.checkpoint {bad}"):
        create_model("test_vit", 3, checkpoint=str(bad))
