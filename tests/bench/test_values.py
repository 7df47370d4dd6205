"""``wisestream bench values``: the output vectors' settings, the rule that picks one, and the report section."""

from __future__ import annotations

import pytest

from bench.report_gate import values_section
from bench.values import choose, load_values_config, score, tag
from orchestrator.config import ConfigError


def _row(keyed, rel, gen, loc, same_loc=0.5, steps=2.0):
    tf = {"reliability": rel, "generalization": gen, "locality": loc}
    return {
        "keyed": keyed,
        "all": {"teacher_forced": tf, "generate": {"reliability": rel, "generalization": gen}},
        "counterfact": {"teacher_forced": tf},
        "samesubject": {"teacher_forced": {**tf, "locality": same_loc}},
        "steps_per_edit": steps,
    }


def test_the_rule_takes_the_highest_mean_of_rel_gen_loc_and_the_first_of_equals():
    rows = [
        _row({"values": False}, 0.99, 0.50, 0.90),
        _row({"values": True, "value_lr": 1.5}, 1.0, 0.83, 0.91),
        _row({"values": True, "value_lr": 5.0}, 1.0, 0.93, 0.85),
    ]
    assert score(rows[1]) == pytest.approx((1.0 + 0.83 + 0.91) / 3)
    assert choose(rows) == 2
    # locality counts as much as generalization: a higher gen bought with more locality loses
    rows.append(_row({"values": True, "value_lr": 50.0}, 1.0, 0.99, 0.70))
    assert choose(rows) == 2
    assert choose([rows[0], dict(rows[0], keyed={"values": True})]) == 0


def test_settings_get_their_own_work_directories():
    assert tag({"values": False}) == "values-off"
    assert tag({"values": True, "value_lr": 1.5}) == "values-lr1.5"
    assert tag({"values": True, "value_lr": 1.5}) != tag({"values": True, "value_lr": 5.0})


def test_values_config_is_checked(tmp_path):
    shipped = load_values_config("configs/bench/values.yaml")
    assert {"values": False} in shipped.grid and any(g.get("values") for g in shipped.grid)
    bad = tmp_path / "values.yaml"
    bad.write_text("grid: [{values: true}]\nrule: mean\n")
    with pytest.raises(ConfigError, match="rule"):
        load_values_config(bad)
    bad.write_text("grid: []\n")
    with pytest.raises(ConfigError, match="grid"):
        load_values_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_values_config(tmp_path / "none.yaml")


def test_report_section_marks_the_chosen_setting():
    rows = [
        _row({"values": False}, 0.99, 0.50, 0.90, 0.51, 7.8),
        _row({"values": True}, 1.0, 0.93, 0.85, 0.23),
    ]
    result = {"edits": 370, "rows": rows, "chosen": {"values": True}, "rule": "highest mean", "command": "x"}
    lines = values_section(result)
    table = [ln for ln in lines if ln.startswith("| values")]
    assert len(table) == 2 and "(chosen)" in table[1] and "(chosen)" not in table[0]
    assert "| 0.797 |" in table[0] and "| 7.8 |" in table[0] and "| 0.230 |" in table[1]
    assert all(ln.count("|") == lines[4].count("|") for ln in table)
    assert values_section(None) == []
