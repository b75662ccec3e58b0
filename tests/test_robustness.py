"""Robustness suite on tiny generated layouts of ImageNet-A, -R and -C: shard writers (labels as
ImageNet-1k indices, the subsets equal timm's official index lists), top-1 with logits restricted
to the subset (a head that prefers a class outside the subset scores 0 unrestricted, 1/3 restricted),
mCE by hand, one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image

from gps_ds.cli import run
from gps_ds.config import load_config
from gps_ds.data.shards import resolve
from gps_ds.delta import save_delta
from gps_ds.models import create_model_from_config
from gps_ds.robustness.metrics import ALEXNET_ERR, CORRUPTIONS, corruption_errors, mce
from gps_ds.rules import classify
from test_multitask import make_delta

INFO = Path(timm.data.__file__).parent / "_info"
SYNSETS = (INFO / "imagenet_synsets.txt").read_text().split()
A_WNIDS = (INFO / "imagenet_a_synsets.txt").read_text().split()
A_INDICES = [int(v) for v in (INFO / "imagenet_a_indices.txt").read_text().split()]
R_WNIDS = (INFO / "imagenet_r_synsets.txt").read_text().split()
R_INDICES = [int(v) for v in (INFO / "imagenet_r_indices.txt").read_text().split()]


def _images(folder, n, rng):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"img{i}.jpg")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    rng = np.random.default_rng(0)
    for which, wnids in (("a", A_WNIDS), ("r", R_WNIDS)):
        for w in wnids[:3]:
            _images(tmp / f"raw-{which}" / w, 3, rng)
    x, y = A_WNIDS[0], A_WNIDS[1]
    for c in CORRUPTIONS:
        for s in range(1, 6):  # severity s: one image of class x, s-1 of class y
            _images(tmp / "raw-c" / c / str(s) / x, 1, rng)
            if s > 1:
                _images(tmp / "raw-c" / c / str(s) / y, s - 1, rng)
    for which in ("a", "r", "c"):
        assert run(["shards", f"imagenet-{which}", str(tmp / f"raw-{which}"), str(tmp / f"sh-{which}"),
                    "--quiet"]) == 0
    return tmp


def test_writers_labels_and_subsets(layouts):
    for which, wnids, indices in (("a", A_WNIDS, A_INDICES), ("r", R_WNIDS, R_INDICES)):
        info = json.loads((layouts / f"sh-{which}" / "_info.json").read_text())
        assert info["kind"] == f"imagenet-{which}" and info["splits"]["test"]["size"] == 9
        assert info["subset_indices"] == sorted(indices) and info["subset_wnids"] == wnids
        assert info["classes"] == SYNSETS
        import tarfile

        labels = []
        for url in resolve(str(layouts / f"sh-{which}"), "test").urls:
            with tarfile.open(url) as tar:
                labels += [int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")]
        assert sorted(labels) == sorted(SYNSETS.index(w) for w in wnids[:3] for _ in range(3))
    info = json.loads((layouts / "sh-c" / "_info.json").read_text())
    assert len(info["splits"]) == 75 and info["splits"]["fog-4"]["size"] == 4


def _suite_config(tmp, head_bias=None):
    raw = {"model": {"name": "test_vit", "img_size": 32, "num_classes": 1000},
           "data": {"recipe": "imagenet", "image_size": 32, "workers": 0},
           "deepspeed": {"train_micro_batch_size_per_gpu": 8}, "tracking": {"enabled": False}}
    (tmp / "cfg.json").write_text(json.dumps(raw))
    cfg = load_config(tmp / "cfg.json")
    base = create_model_from_config(cfg)
    delta = make_delta(base, classify(base), 1, 1000, seed=3)
    if head_bias is not None:
        delta.whole["head.weight"] *= 0.0
        delta.whole["head.bias"] = head_bias
    save_delta(tmp / "d.safetensors", delta)
    return tmp / "cfg.json", tmp / "d.safetensors"


def test_restricted_top1(layouts, tmp_path, capsys):
    outside = next(i for i in range(1000) if i not in A_INDICES and i not in R_INDICES)
    bias = torch.zeros(1000)
    bias[outside] = 100.0  # the unrestricted arg-max: never a label of A or R
    bias[SYNSETS.index(A_WNIDS[0])] = 50.0  # the best class inside the A subset
    bias[SYNSETS.index(R_WNIDS[1])] = 50.0  # ... and inside the R subset
    cfg, delta = _suite_config(tmp_path, bias)
    assert run(["eval", "--config", str(cfg), "--delta", str(delta), "--suite", "imagenet-robustness",
                "--imagenet-a", str(layouts / "sh-a"), "--imagenet-r", str(layouts / "sh-r"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    # A: every image predicted A_WNIDS[0] -> 3 of 9 right; R: R_WNIDS[1] -> 3 of 9 (R_WNIDS[1] not in A's top-3
    # set does not matter: the R logits are restricted to R's subset)
    assert r["imagenet_a"] == {"top1": pytest.approx(100 / 3), "count": 9, "classes": 200}
    assert r["imagenet_r"]["top1"] == pytest.approx(100 / 3) and r["imagenet_r"]["count"] == 9
    assert "imagenet_c" not in r


def test_c_errors_per_severity(layouts, tmp_path, capsys):
    bias = torch.zeros(1000)
    bias[SYNSETS.index(A_WNIDS[0])] = 100.0  # predicts class x: severity s has 1 right of s -> error 1 - 1/s
    cfg, delta = _suite_config(tmp_path, bias)
    assert run(["eval", "--config", str(cfg), "--delta", str(delta), "--suite", "imagenet-robustness",
                "--imagenet-c", str(layouts / "sh-c"), "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["imagenet_c"]
    assert c["complete"] and len(c["splits"]) == 75
    mean_err = np.mean([1 - 1 / s for s in range(1, 6)])
    for k in CORRUPTIONS:
        assert c["splits"][f"{k}-3"]["top1"] == pytest.approx(100 / 3)
        assert c["ce"][k] == pytest.approx(100 * mean_err / ALEXNET_ERR[k])
    assert c["mce"] == pytest.approx(np.mean([100 * mean_err / ALEXNET_ERR[k] for k in CORRUPTIONS]))


def test_mce_hand_worked():
    assert mce({k: {s: ALEXNET_ERR[k] for s in range(1, 6)} for k in CORRUPTIONS}) == pytest.approx(100.0)
    # fog: 0.2 0.3 0.4 0.5 0.6 -> mean 0.4 -> CE 100 * 0.4 / 0.819324
    assert corruption_errors({"fog": {1: .2, 2: .3, 3: .4, 4: .5, 5: .6}})["fog"] == pytest.approx(48.8207, abs=1e-3)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        mce({"rain": {1: 0.5}})


def test_user_errors(layouts, tmp_path, capsys):
    bad = tmp_path / "raw"
    _images(bad / SYNSETS[0], 1, np.random.default_rng(1))  # tench: not an ImageNet-A class
    assert run(["shards", "imagenet-a", str(bad), str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not one of the subset's 200 classes" in err[0]
    (tmp_path / "wnids.txt").write_text(f"{SYNSETS[0]}\n")  # a custom list accepts it
    assert run(["shards", "imagenet-a", str(bad), str(tmp_path / "o"), "--wnids", str(tmp_path / "wnids.txt"),
                "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["subset_indices"] == [0]
    assert run(["shards", "imagenet-c", str(layouts / "raw-c"), str(tmp_path / "c"), "--corruptions", "rain"]) == 2
    assert "unknown corruption 'rain'" in capsys.readouterr().err
    cfg, delta = _suite_config(tmp_path)
    assert run(["eval", "--config", str(cfg), "--delta", str(delta), "--suite", "imagenet-robustness",
                "--imagenet-a", str(layouts / "sh-r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an imagenet-a shard folder" in err[0]
