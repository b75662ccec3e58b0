"""`gps-ds bench trainer`: configs, the log parsing and CPU accounting (a stand-in trainer that burns a
known CPU time per step in a child process), and one real `gps-ds train` run on a tiny model."""

import json
import sys
import textwrap
from pathlib import Path

import pytest

from gps_ds.bench import trainer as BT
from gps_ds.cli import run
from gps_ds.config import validate_config


def test_method_configs_validate(tmp_path):
    shards = (tmp_path / "train", tmp_path / "test")
    for method in BT.METHODS:
        raw = BT.method_config(method, "vit_small_patch16_224", shards, tmp_path / method, batch=8, steps=6,
                               log_every=2, k=1, workers=1, img_size=224)
        cfg = validate_config(raw)
        assert cfg.data.steps_per_epoch == 6 and cfg.train.log_every == 2 and cfg.train.epochs == 1
        assert cfg.deepspeed["train_micro_batch_size_per_gpu"] == 8 and not cfg.output.checkpoints
        assert cfg.train.method == {"gps-sparse": "gps"}.get(method, method)
    gps = validate_config(BT.method_config("gps-sparse", "m", shards, tmp_path, batch=1, steps=2, log_every=1, k=3,
                                           workers=0, img_size=32))
    assert (gps.gps.k, gps.gps.mode, gps.gps.scheme) == (3, "sparse", "random-neuron")


def test_summarize_by_hand():
    # lines at steps 2, 4, 6, 8 with the process tree's CPU seconds 10, 13, 17, 19
    windows = [{"step": s, "images_per_s": ips, "step_s": st, "cpu_s": c}
               for s, ips, st, c in [(2, 1.0, 8.0, 10.0), (4, 4.0, 2.0, 13.0), (6, 2.0, 4.0, 17.0), (8, 8.0, 1.0, 19.0)]]
    s = BT.summarize(windows, batch=8)
    assert s["images_per_s"] == 4.0 and s["step_s"] == 2.0  # medians of windows 2-4 (the first is start-up)
    assert s["cpu_windows"] == [1.5, 2.0, 1.0] and s["cpu_s_per_step"] == 1.5 and s["cpu_images_per_s"] == 8 / 1.5
    with pytest.raises(BT.BenchError, match="1 window"):
        BT.summarize(windows[:1], batch=8)


FAKE = textwrap.dedent('''
    """Stands in for `gps-ds train`: per optimizer step a long-lived child process (like a data
    worker) burns BURN CPU seconds; every log_every steps a line in the trainer's format."""
    import json, subprocess, sys, time
    cfg = json.load(open(sys.argv[sys.argv.index("--config") + 1]))
    steps, every = cfg["data"]["steps_per_epoch"], cfg["train"]["log_every"]
    batch = cfg["deepspeed"]["train_micro_batch_size_per_gpu"]
    worker = ("import sys, time\\n"
              "for line in sys.stdin:\\n"
              "    t = time.process_time()\\n"
              "    while time.process_time() - t < float(line):\\n"
              "        pass\\n"
              "    print(1, flush=True)\\n")
    child = subprocess.Popen([sys.executable, "-c", worker], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        child.stdin.write("BURN\\n")
        child.stdin.flush()
        child.stdout.readline()
        if step % every == 0:
            dt = (time.perf_counter() - t0) / every
            print(f"epoch 0 batch {step}/{steps} step {step}: loss 2.3026 lr 0.0001 {batch / dt:.1f} img/s {dt:.3f} s/step",
                  file=sys.stderr, flush=True)
            t0 = time.perf_counter()
    child.stdin.close()
    child.wait()
    print(json.dumps({"method": cfg["train"]["method"]}))
''')


def test_plumbing_with_a_stand_in_trainer(tmp_path, monkeypatch):
    """Windows parsed from the log, CPU time of the child counted per step, order rotated per model."""
    burn = 0.15
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE.replace("BURN", str(burn)))
    seen = []
    monkeypatch.setattr(BT, "train_command", lambda cfg: [sys.executable, str(script), "--config", str(cfg)])
    monkeypatch.setattr(BT, "write_shards", lambda folder, images: (folder / "a", folder / "b"))
    real_run = BT.run_trainer

    def recording(cfg, workdir, timeout, threads=None):
        seen.append((cfg["model"]["name"], cfg["train"]["method"]))
        return real_run(cfg, workdir, timeout, threads)

    monkeypatch.setattr(BT, "run_trainer", recording)
    r = BT.bench_trainer(["m1", "m2"], ["full", "linear"], batch=4, steps=8, log_every=2, images=8,
                         workdir=tmp_path / "w")
    assert seen == [("m1", "full"), ("m1", "linear"), ("m2", "linear"), ("m2", "full")]
    for model in ("m1", "m2"):
        for method in ("full", "linear"):
            res = r["results"][model][method]
            run_ = res["runs"][0]
            assert len(run_["windows"]) == 3  # 4 lines, the first dropped
            # per step: the child's burn plus a little of the parent's own work (pipes, Python)
            assert burn * 0.9 <= res["cpu_s_per_step"] <= burn * 1.6, res["cpu_s_per_step"]
            # batch / s per step agrees with the images/s figure the (stand-in) trainer printed
            assert res["images_per_s"] == pytest.approx(sorted(run_["windows"])[1], rel=0.05)
    assert r["results"]["m1"]["full"]["x_full_images_per_s"] == 1.0
    assert BT.goal_line(r) is None  # the goal names ViT-B/16 only


def test_goal_line_basis():
    def result(other_cores):
        res = {"gps-sparse": {"x_full_images_per_s": 4.0, "x_full_cpu": 1.30}, "full": {}}
        return {"k": 1, "results": {BT.GOAL_MODEL: res}, "machine": {"cores": 2, "other_load_cores": other_cores}}

    assert "4.000x by wall-clock images/s: met" in BT.goal_line(result(0.1))
    loaded = BT.goal_line(result(1.5))  # judged by CPU time: 1.30 < 1.35
    assert "1.300x by process CPU time per step (other processes loaded the machine): **missed**" in loaded


def test_bad_arguments_one_line(capsys):
    assert run(["bench", "trainer", "--steps", "2", "--log-every", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fewer than 2 log windows" in err[0]
    assert run(["bench", "trainer", "--methods", "full,bitfit"]) == 2
    assert "unknown method 'bitfit'" in capsys.readouterr().err


def test_real_trainer_tiny_model(tmp_path, capsys):
    """One real `gps-ds train` run (test_vit, 32 px, gps-sparse) through the bench, section written."""
    md = tmp_path / "B.md"
    code = run(["bench", "trainer", "--models", "test_vit", "--methods", "gps-sparse", "--batch", "4", "--steps", "4",
                "--log-every", "1", "--images", "16", "--workers", "0", "--img-size", "32",
                "--workdir", str(tmp_path / "w"), "--json", "--write", str(md)])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = result["results"]["test_vit"]["gps-sparse"]
    run_ = res["runs"][0]
    assert len(run_["windows"]) == 3 and all(w > 0 for w in run_["windows"]) and res["cpu_s_per_step"] > 0
    # batch / the trainer's s per step agrees with the images/s it logged (median of 3 windows)
    assert res["images_per_s"] == pytest.approx(sorted(run_["windows"])[1], rel=0.05)
    text = md.read_text()
    assert "<!-- bench:trainer:test_vit:k1 -->" in text and "| test_vit | gps-sparse |" in text
    assert (tmp_path / "w" / "runs" / "test_vit-gps-sparse" / "delta_last.safetensors").is_file()
