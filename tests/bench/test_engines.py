"""``wisestream bench engines``: the default editor, the 2-edit editor and the reference settings timed and
measured on the same edits of the tiny model, with ratios computed from the times it printed."""

from __future__ import annotations

import json

import pytest
from helpers import WISE_KEYED, WISE_SHARDS

from orchestrator.config import load_config


def test_three_sides_timed_on_the_same_edits(job_files, tmp_path, capsys):
    from wisestream.cli import main

    compare = tmp_path / "shards.yaml"
    compare.write_text(job_files.read_text().replace(WISE_KEYED, WISE_SHARDS))
    out = tmp_path / "engines.json"
    argv = ["bench", "engines", "--edits", "4", "--config", str(job_files), "--compare", str(compare)]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["command"].startswith("wisestream bench engines --edits 4")
    res = record["result"]
    sides = res["sides"]
    assert list(sides) == ["default", "2-edit", "reference"] and res["edits"] == 4
    assert sides["default"]["settings"]["layout"] == "keyed"
    assert sides["reference"]["engine"] == "naive" and sides["2-edit"]["engine"] == "cached"
    ref = sides["reference"]["settings"]
    assert (ref["n_irrelevant"], ref["margins"]["alpha"], ref["margins"]["beta"]) == (1, 5.0, 20.0)
    s = {k: v["seconds_per_edit"] for k, v in sides.items()}
    assert res["ratio_vs_reference"] == pytest.approx(s["reference"] / s["default"])
    assert res["ratio_vs_2edit"] == pytest.approx(s["2-edit"] / s["default"])
    for side in sides.values():
        tf = side["metrics"]["teacher_forced"]
        assert 0.0 <= tf["reliability"] <= 1.0 and side["steps_per_edit"] >= 1
    assert f"{res['ratio_vs_reference']:.2f}x faster than the reference settings" in printed


def test_engines_refuses_a_compare_config_of_the_keyed_layout(job_files):
    from bench.engines import engine_comparison

    cfg = load_config(job_files)
    with pytest.raises(ValueError, match="wise.layout: shards"):
        engine_comparison(cfg, cfg, n_edits=1)
