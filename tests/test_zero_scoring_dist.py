"""Scoring under DeepSpeed ZeRO 0-3 on several CPU ranks vs the single-process reference.

Each launch (`deepspeed --num_gpus N tests/dist_scripts/zero_scoring_check.py`) loops over
ZeRO stages in one process per rank and writes a JSON report; the tests below assert on it.
Two launches in all (2 ranks: stages 0-3, SupCon, engine reuse; 3 ranks: stages 0-3);
`launchers/select.py` under ZeRO-3 is tested against one process in tests/test_select_partitioned.py.

"Equal to the single-process mask" is asserted on every row: a row may differ only where the
single-process scores tie at the K-th value within 2e-5 of the tensor's largest score (the
rounding of another summation order, itself asserted below 1e-5); magnitude and
random-neuron selections must be bit-for-bit equal (see the script's check_groups).  Every subprocess runs in its own process group with a deadline
and is killed as a group when it passes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_launch import DEADLINE_S, ROOT, launch

SCRIPT = ROOT / "tests" / "dist_scripts" / "zero_scoring_check.py"
KS = ("1", "3")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(DEADLINE_S + 60)]


def run_check(world: int, stages: str, tmp: Path, extra: list[str]) -> dict:
    out = tmp / f"report{world}.json"
    launch(world, [str(SCRIPT), "--stages", stages, "--out", str(out), *extra], tmp / f"log{world}.txt")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report2(tmp_path_factory):
    return run_check(2, "0,1,2,3", tmp_path_factory.mktemp("zs2"), ["--supcon", "--reuse"])


@pytest.fixture(scope="module")
def report3(tmp_path_factory):
    return run_check(3, "0,1,2,3", tmp_path_factory.mktemp("zs3"), [])


def check_equal_up_to_ties(c: dict, what) -> None:
    """Counts from the script's check_groups: every group selects exactly its n entries, and a
    group differs from the brute-force single-process top-n only at a near-tie."""
    assert c["groups"] > 0, what
    assert c["bad_count"] == 0, (what, c)
    assert c["violations"] == 0 and c["differ_unexplained"] == 0, (what, c)
    assert c["differ_without_near_tie"] == 0, (what, c)
    assert c["differ"] <= c["near_tie_groups"], (what, c)


def check_stage(entry: dict, world: int) -> None:
    assert entry["max_rel_score_err"] < 1e-5
    for k in KS:
        check_equal_up_to_ties(entry["gps"][k], ("gps", k))
        assert entry["gps"][k]["tensors_missing"] == 0
    for scheme in ("net", "layer"):
        check_equal_up_to_ties(entry[scheme], scheme)
    # No numerical reason to differ: bit-for-bit the single-process selection.
    for scheme in ("magnitude", "random_neuron"):
        e = entry[scheme]
        assert e["tensors"] > 0 and e["tensors_differ"] == 0 and e["rows_differ"] == 0, (scheme, e)
    assert entry["ranks_with_other_digest"] == 0
    assert entry["samples"] == 48 and entry["batches"] == 4
    # Rank 0 scored only what it owns: about 1/world of the candidates (ZeRO rounds each
    # tensor's or group's partition up a little).
    total = entry["memory"]["candidate_numel"]
    assert entry["rank0_owned_entries"] <= 1.02 * total / world + 64


def check_no_optimizer_state(entry: dict) -> None:
    mem = entry["memory"]
    assert mem["optimizer_state_entries"] == 0 and "optimizer_state" not in mem["by_attribute"]
    share = mem["candidate_fp32_share_bytes"]
    if mem["stage"] == 0:
        assert mem["wrapper_bytes"] == 0  # plain torch SGD: nothing but the gradients
        assert mem["param_grad_bytes"] == 4 * mem["candidate_numel"]
        return
    # fp32 master partition + gradient partition, each 1/world of the candidates up to ZeRO's
    # alignment padding (+ ZeRO-3's reduce bucket, capped at the candidates' size).  AdamW's
    # state would add two more partitions.
    bucket = mem["by_attribute"].get("ipg_buckets", 0)
    assert bucket <= 4 * mem["candidate_numel"]
    assert mem["wrapper_bytes"] - bucket <= 1.05 * 2 * share + 64
    adam = entry["adamw_after_one_step"]
    assert adam["optimizer_state_entries"] >= 1
    assert adam["by_attribute"]["optimizer_state"] >= 2 * share  # exp_avg + exp_avg_sq we did not allocate


@pytest.mark.parametrize("stage", ["0", "1", "2", "3"])
def test_two_ranks_match_single_process(report2, stage):
    check_stage(report2["stages"][stage], 2)


@pytest.mark.parametrize("stage", ["0", "1", "2", "3"])
def test_two_ranks_allocate_no_optimizer_state(report2, stage):
    check_no_optimizer_state(report2["stages"][stage])


def test_zero3_partitions_weights_for_magnitude(report2):
    assert report2["stages"]["3"]["zero3_partitioned_weights"]
    assert not report2["stages"]["0"]["zero3_partitioned_weights"]


def test_two_ranks_supcon_zero3(report2):
    s = report2["supcon_zero3"]
    assert s["max_rel_score_err"] < 1e-5
    check_equal_up_to_ties(s, "supcon")


def test_released_zero3_model_trains(report2):
    r = report2["reuse_after_release"]
    # The released, still partitioned model computes what the fresh model computes...
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-6)
    # ...its untrained weights are the fresh ones, bit for bit...
    assert r["backbone_tensors"] > 0 and r["backbone_bit_identical"]
    # ...and one AdamW step on the head equals one process's step on the global batch.
    assert r["head_moved_entries"] == r["head_entries"] > 0
    assert r["head_max_abs_err"] < 1e-6, r


@pytest.mark.parametrize("stage", ["0", "1", "2", "3"])
def test_three_ranks_match_single_process(report3, stage):
    check_stage(report3["stages"][stage], 3)
    check_no_optimizer_state(report3["stages"][stage])
