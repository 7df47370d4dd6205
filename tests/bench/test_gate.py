"""The routing-rules benchmark: every gate value's outcomes from one gate-off measurement and the pre-edit
probes must equal a real evaluation with that gate set on the router, and so must the free-generation outcomes
derived for whole names; the choice rules and the split of probes by record."""

import dataclasses

import pytest
from helpers import tiny_keyed_config

from bench.gate import (
    _split,
    choose_gate,
    derive_free,
    gate_probes,
    load_gate_config,
    metrics_row,
    within,
)
from orchestrator.config import ConfigError
from wise.evaluate import concat_probes, probe_records
from wise.keyed.editor import KeyedEditor
from wise.keyed.names import name_flags


def test_gated_probes_equal_an_evaluation_with_the_gate_set(tiny_model, tiny_tokenizer, edits, pool):
    ed = KeyedEditor(tiny_model, tiny_tokenizer, tiny_keyed_config(), irrelevant=pool)
    # another relation of edited subjects, as locality probes: what a gate is for
    records = list(edits) + [
        dataclasses.replace(
            edits[0], id="s0", locality_prompt="Danielle Darrieux was born in", locality_answer="Paris"
        ),
        dataclasses.replace(
            edits[1], id="s1", locality_prompt="Edwin of Northumbria died in", locality_answer="York"
        ),
    ]
    ed.apply(edits)
    args = (ed.model, ed.routed, ed.tokens, records)
    post = probe_records(*args, generate=True)
    pre = probe_records(*args, main_only=True, generate=True)
    sims = sorted(
        q - 1.0
        for k in post["ratio"]
        for q, r in zip(post["ratio"][k], post["route"][k], strict=True)
        if r >= 0
    )
    assert len(sims) >= 4
    gates = [sims[0] - 0.01, (sims[len(sims) // 2 - 1] + sims[len(sims) // 2]) / 2, sims[-1] + 0.01]
    for gate in gates:
        ed.routed.min_similarity = gate
        real = probe_records(*args, generate=True)
        want = gate_probes(post, pre, gate)
        for key in ("rel", "gen", "loc", "rel_hit", "gen_hit"):
            assert want[key] == pytest.approx(real[key], abs=1e-6), (gate, key)
        assert want["route"] == real["route"], gate
    # the middle gate refuses some routed probes and keeps others: the comparison above is not vacuous
    middle = gate_probes(post, pre, gates[1])["route"]
    kept = sum(r >= 0 for k in middle for r in middle[k])
    assert 0 < kept < len(sims)
    assert gate_probes(post, pre, None) == {**post, "route": post["route"], "ratio": post["ratio"]}


def test_free_generation_derived_for_whole_names_equals_an_evaluation_with_them(
    tiny_model, tiny_tokenizer, edits, pool
):
    ed = KeyedEditor(tiny_model, tiny_tokenizer, tiny_keyed_config(), irrelevant=pool)
    ed.apply(edits)
    # the rule sends the first to the main memory and the second to another edit (Toko Yasuda stands alone)
    records = list(edits) + [
        dataclasses.replace(edits[0], id="n0", prompt="Jill Danielle Darrieux speaks", rephrase=()),
        dataclasses.replace(
            edits[1],
            id="n1",
            prompt="Jill Edwin of Northumbria met Toko Yasuda, who plays the",
            rephrase=("Jill Edwin of Northumbria follows",),
        ),
    ]
    args = (ed.model, ed.routed, ed.tokens, records)
    flags = name_flags(tiny_tokenizer)
    with ed.routed.names(None):
        off = probe_records(*args, generate=True)
    with ed.routed.names(flags):
        real = probe_records(*args, generate=True)
        on = probe_records(*args, generate=False)
    pre = probe_records(*args, main_only=True, generate=True)
    changed = [(a, b) for a, b in zip(on["route"]["edit"], off["route"]["edit"], strict=True) if a != b]
    assert len(changed) == 2 and {a >= 0 for a, _ in changed} == {True, False}  # both derivations are used
    asked = []

    def measure(indices):
        asked.append(indices)
        with ed.routed.names(flags):
            return probe_records(*args[:3], [records[i] for i in indices], generate=True)

    assert derive_free(on, off, pre, measure) == 1 and asked == [[len(records) - 1]]
    assert on["rel_hit"] == real["rel_hit"] and on["gen_hit"] == real["gen_hit"]


def test_locality_probes_asking_an_edited_prompt_are_counted_apart(edits):
    # e2's locality prompt is e0's edit prompt (case and final punctuation aside): the stream changed its answer
    records = list(edits[:3])
    records[2] = dataclasses.replace(records[2], locality_prompt=records[0].prompt.upper() + " ?")
    probes = {
        "records": 3,
        "rel": [1.0, 1.0, 1.0],
        "gen": [0.0, 0.0],
        "gen_owner": [0, 1],
        "loc": [1.0, 0.5, 0.0],
        "loc_owner": [0, 1, 2],
        "route": {"edit": [0, 1, 2], "rephrase": [0, 1], "locality": [-1, -1, 0]},
        "ratio": {"edit": [1.0] * 3, "rephrase": [1.0] * 2, "locality": [0.0, 0.0, 1.0]},
    }
    row = metrics_row(probes, records)
    assert row["teacher_forced"]["locality"] == 0.5
    assert row["conflicts"] == {
        "probes": 1,
        "locality_others": 0.75,
        "edited_facts": 1,
        "locality_unedited_facts": 0.75,
        "locality_probes": 3,
        "locality_ceiling": 2 / 3,
    }


def test_whole_names_are_kept_only_within_tolerance():
    base = {
        "teacher_forced": {"reliability": 0.99, "generalization": 0.5},
        "generate": {"reliability": 0.98, "generalization": 0.5},
    }
    close = {
        "teacher_forced": {"reliability": 0.98, "generalization": 0.49},
        "generate": {"reliability": 0.98, "generalization": 0.5},
    }
    far = {**close, "generate": {"reliability": 0.98, "generalization": 0.47}}
    assert within(close, base, 0.02) and not within(far, base, 0.02)


def test_split_then_concat_gives_back_the_probes():
    probes = {
        "records": 3,
        "rel": [1.0, 0.5, 0.0],
        "rel_hit": [1.0, 0.0, 0.0],
        "gen": [0.1, 0.2, 0.3, 0.4],
        "gen_hit": [1.0, 1.0, 0.0, 0.0],
        "gen_owner": [0, 0, 1, 2],
        "loc": [1.0, 0.0, 1.0],
        "loc_owner": [0, 1, 2],
        "route": {"edit": [0, 1, -1], "rephrase": [0, -1, 1, 2], "locality": [-1, 1, -1]},
        "ratio": {"edit": [2.0, 1.5, 0.0], "rephrase": [1.2, 0.0, 1.1, 1.3], "locality": [0.0, 1.9, 0.0]},
    }
    a, b = _split(probes, 1)
    assert a["gen"] == [0.1, 0.2] and b["gen_owner"] == [0, 1] and b["loc"] == [0.0, 1.0]
    assert concat_probes([a, b]) == probes


def _row(gate, rel, gen, frel, fgen):
    return {
        "gate": gate,
        "all": {
            "teacher_forced": {"reliability": rel, "generalization": gen, "locality": 1.0},
            "generate": {"reliability": frel, "generalization": fgen},
        },
    }


def test_the_chosen_gate_is_the_highest_within_tolerance_on_every_metric():
    rows = [
        _row(None, 0.99, 0.40, 0.98, 0.45),
        _row(0.1, 0.99, 0.40, 0.98, 0.45),
        _row(0.2, 0.98, 0.39, 0.97, 0.44),
        _row(0.3, 0.99, 0.37, 0.98, 0.45),  # generalization falls 0.03
        _row(0.4, 0.99, 0.40, 0.95, 0.45),  # free reliability falls 0.03
    ]
    assert choose_gate(rows, 0.02) == 0.2
    assert choose_gate(rows, 0.05) == 0.4
    assert choose_gate(rows[:1] + rows[3:], 0.02) is None


def test_gate_config_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "gate.yaml"
    bad.write_text("dev: {path: x.json}\ngrid: [0.1]\nthreshold: 0.3\n")
    with pytest.raises(ConfigError, match="threshold"):
        load_gate_config(bad)
    assert load_gate_config("configs/bench/gate.yaml").apply == ("keyed/counterfact-long",)


def test_report_section_shows_the_sweep_the_choice_and_the_test_rows():
    from bench.report_gate import gate_section

    def metrics(rel, loc):
        return {
            "teacher_forced": {"reliability": rel, "generalization": 0.3, "locality": loc},
            "generate": {"reliability": rel, "generalization": 0.3},
            "routed_fraction": {"edit": 1.0, "rephrase": 1.0, "locality": 0.1},
        }

    dev = {
        "edits": 370,
        "counterfact_edits": 300,
        "mixed": "samesubject",
        "rule": "highest gate within 0.02",
        "chosen": 0.25,
        "names_chosen": True,
        "names_rows": [
            {
                "whole_names": on,
                "all": metrics(0.99, 0.9),
                "counterfact": metrics(0.99, loc),
                "samesubject": metrics(0.9, 0.5),
            }
            for on, loc in ((False, 0.95), (True, 0.96))
        ],
        "rows": [
            {
                "gate": g,
                "all": metrics(0.99, 0.9),
                "counterfact": metrics(0.99, 0.97),
                "samesubject": metrics(0.9, same),
            }
            for g, same in ((None, 0.5), (0.25, 0.8))
        ],
    }
    test = {
        "T": 9000,
        "ungated_vs_result": 1e-7,
        "free_generation_measured": 3,
        "rows": [{"whole_names": False, "gate": None, "metrics": metrics(0.9, 0.87)}],
    }
    lines = gate_section(
        {"dev": dev, "test": {"keyed/counterfact-long": test}, "command": "wisestream bench gate"}
    )
    text = "\n".join(lines)
    assert (
        "Chosen: **0.25**" in text
        and "Chosen: **on**" in text
        and "| off | 0.990 | 0.300 | 0.990 | 0.300 | 0.970 | 0.500 | 10.0% |" in text
        and "| on | 0.990 | 0.300 | 0.990 | 0.300 | 0.960 | 0.500 | 10.0% |" in text
    )
    assert (
        "| keyed/counterfact-long | 9000 | off | off | 0.900 | 0.300 | 0.870 | 0.900 | 0.300 | 0.690 | 10.0% |"
        in text
        and "(keyed/counterfact-long 3)" in text
    )
    assert gate_section(None) == []
    # a development-only result (no run under apply) under its own title: the sweep, no test table
    dev_only = "\n".join(gate_section({"dev": dev, "test": {}}, title="Routing rules for keyed-values"))
    assert dev_only.startswith("## Routing rules for keyed-values\n") and "Chosen: **0.25**" in dev_only
    assert "| run | T |" not in dev_only and "| run | T |" in text


def test_a_missing_or_broken_gate_config_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_gate_config(tmp_path / "none.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("dev: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_gate_config(broken)


def test_a_run_rekeyed_measures_as_an_evaluation_of_its_rekeyed_state(
    tiny_model, tiny_tokenizer, edits, pool, tmp_path
):
    import copy
    import json

    from bench.gate import measure_run
    from bench.milestones import milestone_path
    from bench.quality import DatasetSpec, MethodSpec, QualityConfig, RunSpec, plan_run

    # one rephrase per edit (as the runs have); two relations of one subject: which of them answers a query is
    # the relation key's choice (on the tiny model, the mean key sends e0's rephrase to e4, the residual to e0)
    recs = [
        e if e.rephrase else dataclasses.replace(e, rephrase=("Toko Yasuda is a player of",)) for e in edits
    ]
    recs[0] = dataclasses.replace(recs[0], rephrase=("In which city was Danielle Darrieux born?",))
    recs += [
        dataclasses.replace(
            edits[0],
            id="e4",
            prompt="Danielle Darrieux was born in",
            target="Rome",
            rephrase=("The birthplace of Danielle Darrieux is",),
            locality_prompt="Danielle Darrieux died in",
        )
    ]
    data = tmp_path / "edits.jsonl"
    data.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in recs))
    keyed = {"mean": {}, "residual": {"relation_key": "residual", "relation_dim": 32}}
    settings = {k: tiny_keyed_config(5, **v) for k, v in keyed.items()}
    qcfg = QualityConfig(
        milestones=(len(recs),),
        output=str(tmp_path / "results"),
        work=str(tmp_path / "work"),
        datasets={"tiny": DatasetSpec(path=str(data), format="jsonl")},
        methods={k: MethodSpec(kind="wise", settings=v.model_dump(mode="json")) for k, v in settings.items()},
        runs=[RunSpec(method="mean", dataset="tiny", max_t=len(recs))],
    )
    _, records = plan_run(qcfg, qcfg.runs[0])

    def maker(key):
        return lambda: KeyedEditor(copy.deepcopy(tiny_model), tiny_tokenizer, settings[key], pool)

    own = maker("mean")()
    own.apply(records)
    work = tmp_path / "work" / "tiny" / "mean"
    own.save(work / "state")
    (work / "progress.json").write_text(json.dumps({"applied": len(records)}))
    result = probe_records(own.model, own.routed, own.tokens, records, generate=True)  # whole names on
    path = milestone_path(tmp_path / "results" / "quality" / "tiny" / "mean", len(records))
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps(
            {
                **metrics_row(result, records),
                "per_edit": [
                    {"generate_reliability": a, "generate_generalization": b}
                    for a, b in zip(result["rel_hit"], result["gen_hit"], strict=True)
                ],
                "settings": settings["mean"].model_dump(mode="json"),
            }
        )
    )
    direct = maker("residual")()
    direct.load_rekeyed(work / "state")
    args = (direct.model, direct.routed, direct.tokens, records)
    ungated = probe_records(*args, generate=True)
    edit_probes = zip(ungated["ratio"]["edit"], ungated["route"]["edit"], strict=True)
    sims = sorted(q - 1.0 for q, r in edit_probes if r >= 0)
    gate = (sims[0] + sims[1]) / 2  # refuses the edit probe least like its edit, keeps the others
    out = measure_run(qcfg, "mean/tiny", True, gate, maker("residual"), tmp_path / "work", maker("mean"))
    assert out["rekeyed"] and out["ungated_vs_result"] == 0.0
    # the re-keyed state's cost: the residual key is the model's width (32 fp16 numbers) per edit
    assert out["memory"]["bytes_per_edit"] > 32 * 2 and out["serving"]["prefill_seconds"] > 0
    # the keys route some probe apart: its free generation is measured, not taken from the result
    assert (
        result["route"]["rephrase"] != ungated["route"]["rephrase"] and out["free_generation_measured"] >= 1
    )
    assert [(r["whole_names"], r["gate"], r["rekeyed"]) for r in out["rows"]] == [
        (True, None, False),
        (True, None, True),
        (True, gate, True),
    ]
    direct.routed.min_similarity = gate
    gated = probe_records(*args, generate=True)
    for row, real in zip(out["rows"], (result, ungated, gated), strict=True):
        want = metrics_row(real, records)
        for mode in ("teacher_forced", "generate"):
            assert row["metrics"][mode] == pytest.approx(want[mode], abs=1e-6), (row["gate"], mode)
    assert metrics_row(gated, records)["teacher_forced"] != metrics_row(ungated, records)["teacher_forced"]
    # the same run measured with its own method (no re-keying): whole names off and on, then the gate, each
    # equal to an evaluation of its own state with that setting on the router
    own_out = measure_run(qcfg, "mean/tiny", True, gate, maker("mean"), tmp_path / "work")
    assert not own_out["rekeyed"] and own_out["ungated_vs_result"] == 0.0
    assert [(r["whole_names"], r["gate"]) for r in own_out["rows"]] == [
        (False, None),
        (True, None),
        (True, gate),
    ]
    mine = maker("mean")()
    mine.load(work / "state")
    own_args = (mine.model, mine.routed, mine.tokens, records)
    with mine.routed.names(None):
        off = probe_records(*own_args, generate=True)
    mine.routed.min_similarity = gate
    for row, real in zip(
        own_out["rows"], (off, result, probe_records(*own_args, generate=True)), strict=True
    ):
        want = metrics_row(real, records)
        for mode in ("teacher_forced", "generate"):
            assert row["metrics"][mode] == pytest.approx(want[mode], abs=1e-6), (row["whole_names"], mode)


def test_pre_edit_probes_of_some_records_land_at_those_records_probes(
    tiny_model, tiny_tokenizer, edits, pool
):
    import math

    from bench.gate import pre_for

    ed = KeyedEditor(tiny_model, tiny_tokenizer, tiny_keyed_config(), irrelevant=pool)
    args = (ed.model, ed.routed, ed.tokens)
    full = probe_records(*args, edits, main_only=True, generate=True)
    wanted = [1, 3]
    got = pre_for(
        full, probe_records(*args, [edits[i] for i in wanted], main_only=True, generate=True), wanted
    )
    for key in ("rel", "gen", "loc", "rel_hit", "gen_hit"):
        owners = full.get(f"{key.split('_')[0]}_owner", range(full["records"]))
        assert len(got[key]) == len(full[key]) > 0, key
        for o, a, b in zip(owners, got[key], full[key], strict=True):
            assert (a == b) if o in wanted else math.isnan(a), (key, o)


def test_pre_edit_probes_are_needed_where_the_gate_refuses_or_a_setting_leaves_the_results_route():
    from bench.gate import pre_needed

    def probes(route, ratio):
        return {
            "records": 3,
            "gen_owner": [0, 1, 2],
            "route": {"edit": route[0], "rephrase": route[1], "locality": route[2]},
            "ratio": {"edit": ratio[0], "rephrase": ratio[1], "locality": ratio[2]},
        }

    # relation similarities (ratio - 1): edits 1.0; rephrases 0.05, 0.3, 0.5; record 1's locality probe 0.05
    carrier = probes(([0, 1, 2], [0, 1, 2], [-1, 0, -1]), ([2.0] * 3, [1.05, 1.3, 1.5], [0.0, 1.05, 0.0]))
    # the same routes: only the gate decides; 0.1 refuses record 0's rephrase and record 1's locality probe
    assert pre_needed([carrier], carrier, None) == []
    assert pre_needed([carrier], carrier, 0.1) == [0, 1]
    assert pre_needed([carrier], carrier, 0.6) == [0, 1, 2]
    # another setting sends record 2's edit prompt to the main memory, which the result routed: needed ungated
    other = probes(([0, 1, -1], [0, 1, 2], [-1, -1, -1]), ([2.0, 2.0, 0.0], [1.05, 1.3, 1.5], [0.0] * 3))
    assert pre_needed([other], carrier, None) == [1, 2]
    assert pre_needed([carrier, other], carrier, 0.1) == [0, 1, 2]
