import json

from gps_ds.cli import run


def test_count_vit_base_k1(capsys):
    assert run(["count", "--model", "vit_base_patch16_224", "--k", "1", "--num-classes", "100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    gps = out["gps"]
    # REFERENCE.md: ViT-B/16 with K=1 trains 83,712 selected weights + 83,712 biases (+ head).
    assert gps["selected"] == 83_712
    assert gps["biases"] == 83_712
    assert gps["head"] == 768 * 100 + 100
    assert gps["total"] == 83_712 + 83_712 + 76_900
    assert out["full"]["total"] == out["parameters"]
    assert out["backbone"] == out["parameters"] - 76_900
    assert 0.28 < gps["percent_of_backbone"] < 0.29


def test_count_k_out_of_range(capsys):
    assert run(["count", "--model", "test_vit", "--k", "100000", "--num-classes", "10"]) == 2
    err = capsys.readouterr().err
    assert "gps.k=100000" in err and "fan_in" in err and "Traceback" not in err
    assert run(["count", "--model", "no_such_model", "--k", "1"]) == 2
    assert "no_such_model" in capsys.readouterr().err
