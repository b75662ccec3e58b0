import json
import subprocess
import sys

import pytest

from gps_ds.cli import run
from gps_ds.config import ConfigError, apply_overrides, load_config


def write(tmp_path, obj, name="c.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, {"gps": {"k": 2}, "deepspeed": {"train_micro_batch_size_per_gpu": 8}})
    cfg = load_config(p, ["gps.k=5", "gps.scheme=net", "deepspeed.zero_optimization.stage=3",
                          "model.kwargs={\"global_pool\": \"avg\"}", "tracking.run_name=abc"])
    assert cfg.gps.k == 5 and cfg.gps.scheme == "net"
    assert cfg.deepspeed == {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3}}
    assert cfg.model.kwargs == {"global_pool": "avg"}
    assert cfg.tracking.run_name == "abc"
    assert cfg.gps.temperature == 0.07 and cfg.gps.mode == "sparse" and cfg.gps.loss == "supcon"


def test_override_parsing():
    assert apply_overrides({}, ["a.b=1", "a.c=x y", "d=[1,2]", "e=true"]) == {"a": {"b": 1, "c": "x y"}, "d": [1, 2], "e": True}
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="'gps.k' is not a section"):
        apply_overrides({"gps": {"k": 1}}, ["gps.k.x=2"])


@pytest.mark.parametrize("raw, overrides, message", [
    ({"gps": {"kk": 1}}, [], "unknown config key 'gps.kk'"),
    ({"gps": {"k": "many"}}, [], "config key 'gps.k'"),
    ({}, ["gps.k=0"], "config key 'gps.k'"),
    ({}, ["gps.scheme=best"], "config key 'gps.scheme'"),
    ({}, ["gps.loss=mse"], "config key 'gps.loss'"),
    ({}, ["gps.mask=/no/such/mask.safetensors"], "file not found: /no/such/mask.safetensors"),
    ({"nosection": {}}, [], "unknown config key 'nosection'"),
])
def test_bad_values_name_the_key(tmp_path, raw, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, raw), overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        load_config(write(tmp_path, "{oops"))


def test_cli_reports_one_line_and_exit_2(tmp_path, capsys):
    p = write(tmp_path, {"gps": {"k": -1}})
    assert run(["select", "--config", str(p), "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gps.k" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gps_ds.cli", "select", "--config", str(tmp_path / "x.json"), "--out", "m"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"config file not found: {tmp_path / 'x.json'}")
    assert "Traceback" not in proc.stderr
