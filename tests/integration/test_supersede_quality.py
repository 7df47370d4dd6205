"""Edits that change, on the real embedded model: 10 facts edited to A, 10 unrelated edits, the same 10 facts
edited to B. B must be answered, A no more than the unedited model answers it, and the unrelated edits must be
retained as well as before B came. Several minutes on 2 CPU cores."""

from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.job import run_job
from orchestrator.model_store import resolve_model_path
from streams import EditStream, open_source
from wise.evaluate import evaluate_records
from wise.factory import make_editor
from wise.state import read_state

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_ten_facts_edited_twice_answer_the_second_edit_and_keep_the_unrelated_ones(tmp_path, ray_local):
    recs = [r for _, r in EditStream(open_source(ROOT / "data" / "counterfact_100.json"))]
    facts_a, unrelated, others = recs[:10], recs[10:20], recs[20:40]
    # B: the same prompts with another record's target (never the fact's A target or its true answer)
    targets = [t for t in dict.fromkeys(r.target for r in others)]
    facts_b = []
    for i, a in enumerate(facts_a):
        target = next(t for t in targets[i:] + targets if t not in (a.target, a.ground_truth))
        facts_b.append(a.model_copy(update={"id": f"b-{a.id}", "target": target}))
    records = [*facts_a, *unrelated, *facts_b]
    out = tmp_path / "job"
    cfg = load_config(ROOT / "configs" / "default.yaml", [f"output.dir={out}", "eval.generate=false"])

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg.model.name)
    ed = make_editor(
        AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), cfg.wise
    )

    def reliability(rows, main_only=False) -> float:
        res = evaluate_records(ed.model, ed.routed, ed.tokens, rows, main_only=main_only, generate=False)
        return res["teacher_forced"]["reliability"]

    first = run_job(cfg.model_copy(update={"max_edits": 20}), records=records)
    assert first["edits_applied"] == 20
    ed.load_state_dict(*read_state(out / "state"))
    unrelated_before = reliability(unrelated)
    report = run_job(cfg.model_copy(update={"max_edits": 30}), records=records)
    assert report["edits_superseded"] == 10 and report["edits_applied"] == 20 and report["edits_lost"] == 0
    ed.load_state_dict(*read_state(out / "state"))
    pre_a = reliability(facts_a, main_only=True)
    got = {
        "b": reliability(facts_b),
        "a": reliability(facts_a),
        "a_pre": pre_a,
        "unrelated": reliability(unrelated),
        "unrelated_before_b": unrelated_before,
    }
    print("supersede quality:", got)
    assert got["b"] >= 0.9, got
    assert got["a"] <= pre_a + 0.05, got
    assert abs(got["unrelated"] - unrelated_before) <= 0.05, got
