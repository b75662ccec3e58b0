"""The demo's segmentation stage on a tiny budget: the three methods run, select on validation,
and print a table whose numbers are the runs' own summaries."""

import json

from gps_ds import demo_segmentation as seg


def test_segmentation_stage_rows_match_the_runs(tmp_path, capsys):
    rows = seg.run_segmentation_stage(tmp_path, pretrain_size=60, size=60, pretrain_epochs=1, epochs=1)
    assert [r["method"] for r in rows] == ["gps", "decoder", "full"]
    for r in rows:
        summary = json.loads((tmp_path / "stage3-seg" / r["method"] / "summary.json").read_text())
        assert summary["select_on"] == "val" and summary["task"] == "segmentation"
        assert (r["mdice"], r["miou"]) == (summary["test"]["mdice"], summary["test"]["miou"])
        assert r["trained"] == summary["trainable"]["total"]
    assert rows[0]["trained"] < rows[2]["trained"]
    out = capsys.readouterr().out
    assert "| gps |" in out and "test mDice" in out
