"""Layout mapping (ZsRE, CounterFact, canonical) and detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streams import LAYOUTS, EditRecord, FormatError, InvalidRecordError, RecordLimits, detect_layout
from streams.layouts import get_layout, sniff_layout

DATA = Path(__file__).resolve().parents[2] / "data"  # the samples the project ships
LIMITS = RecordLimits()

ZSRE_ROW = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: who plays the cat in the hat movie",
    "loc_ans": "Mike Myers",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}
CF_ROW = {
    "case_id": 7,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}


def test_zsre_mapping() -> None:
    record = LAYOUTS["zsre"].to_record(ZSRE_ROW, 12, LIMITS)
    assert record.id == "zsre-12"
    assert record.prompt == ZSRE_ROW["src"]
    assert record.target == "unmanned aircraft"
    assert record.subject == "UniFirst"
    assert record.rephrase == (ZSRE_ROW["rephrase"],)
    assert record.locality_prompt == ZSRE_ROW["loc"]
    assert record.locality_answer == "Mike Myers"
    assert record.ground_truth == "uniform"


def test_counterfact_mapping() -> None:
    record = LAYOUTS["counterfact"].to_record(CF_ROW, 0, LIMITS)
    assert record.id == "cf-7"
    assert record.target == "English"
    assert record.rephrase == (CF_ROW["rephrase_prompt"],)
    assert record.locality_answer == "French"
    assert record.ground_truth == "French"


def test_canonical_requires_id() -> None:
    with pytest.raises(InvalidRecordError, match="id: required field missing"):
        LAYOUTS["canonical"].to_record({"prompt": "p", "target": "t"}, 0, LIMITS)


def test_layout_errors_name_the_users_key() -> None:
    with pytest.raises(InvalidRecordError) as info:
        LAYOUTS["zsre"].to_record({**ZSRE_ROW, "alt": 3}, 0, LIMITS)
    assert info.value.reason == "alt (target): must be a non-empty string, got int"
    with pytest.raises(InvalidRecordError) as info:
        LAYOUTS["counterfact"].to_record({**CF_ROW, "target_new": ""}, 0, LIMITS)
    assert info.value.reason.startswith("target_new (target): must be a non-empty string")


@pytest.mark.parametrize("layout", ["zsre", "counterfact"])
def test_missing_layout_key_and_non_mapping_rows(layout: str) -> None:
    row = dict(ZSRE_ROW if layout == "zsre" else CF_ROW)
    key = "alt" if layout == "zsre" else "target_new"
    del row[key]
    with pytest.raises(InvalidRecordError, match=f"{key}: required {layout} key missing"):
        LAYOUTS[layout](row, 0)
    with pytest.raises(InvalidRecordError, match="row must be a JSON object, got list"):
        LAYOUTS[layout]([1, 2], 0)


def test_counterfact_bad_case_id() -> None:
    with pytest.raises(InvalidRecordError, match="case_id: must be an int or a non-empty string, got float"):
        LAYOUTS["counterfact"]({**CF_ROW, "case_id": 1.5}, 0)


def test_detect_layout() -> None:
    assert detect_layout(ZSRE_ROW) == "zsre"
    assert detect_layout(CF_ROW) == "counterfact"
    assert detect_layout({"id": "a", "prompt": "p", "target": "t"}) == "canonical"
    with pytest.raises(FormatError) as info:
        detect_layout({"question": "q", "answer": "a"})
    message = str(info.value)
    assert "['answer', 'question']" in message
    for name in ("zsre", "counterfact", "canonical"):
        assert name in message


def test_sniff_skips_broken_first_rows() -> None:
    assert sniff_layout([None, {"junk": 1}, CF_ROW], where="x") == "counterfact"
    assert sniff_layout([], where="x") == "canonical"
    with pytest.raises(FormatError, match="none of the first 2 rows is a JSON object"):
        sniff_layout([1, 2], where="x")


def test_unknown_layout_lists_choices() -> None:
    with pytest.raises(FormatError, match=r"unknown layout 'nope'.*canonical.*counterfact.*zsre"):
        get_layout("nope")


@pytest.mark.parametrize(
    ("name", "layout", "count"),
    [
        ("zsre_100.json", "zsre", 100),
        ("zsre_irrelevant_200.json", "zsre", 200),
        ("counterfact_100.json", "counterfact", 100),
        ("counterfact_irrelevant_400.json", "counterfact", 400),
        ("counterfact_dev_1k.json", "counterfact", 1000),
        ("counterfact_long.json", "counterfact", 9000),
    ],
)
def test_shipped_samples_parse_completely(name: str, layout: str, count: int) -> None:
    rows = json.loads((DATA / name).read_text(encoding="utf-8"))
    assert len(rows) == count and detect_layout(rows[0]) == layout
    records = [LAYOUTS[layout].to_record(row, index, LIMITS) for index, row in enumerate(rows)]
    assert all(record.rephrase and record.locality_text() for record in records)
    assert len({r.id for r in records}) == count


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("nearmiss_dev.jsonl", 70),
        ("nearmiss_test.jsonl", 70),
        ("samesubject_dev.jsonl", 70),
        ("samesubject_test.jsonl", 70),
    ],
)
def test_nearmiss_halves_parse_and_their_probes_differ_from_the_targets(name: str, count: int) -> None:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    records = [LAYOUTS["canonical"].to_record(json.loads(line), i, LIMITS) for i, line in enumerate(lines)]
    assert len(records) == count and len({r.prompt for r in records}) == count
    assert all(r.subject and r.rephrase and r.locality_prompt for r in records)
    assert all(r.locality_answer != r.target for r in records)


@pytest.mark.parametrize("half", ["dev", "test"])
def test_samesubject_halves_mirror_the_nearmiss_edits_and_probe_the_same_subject(half: str) -> None:
    def read(name: str) -> list[EditRecord]:
        lines = (DATA / name).read_text(encoding="utf-8").splitlines()
        return [LAYOUTS["canonical"].to_record(json.loads(line), i, LIMITS) for i, line in enumerate(lines)]

    nearmiss, samesubject = read(f"nearmiss_{half}.jsonl"), read(f"samesubject_{half}.jsonl")
    assert len(samesubject) == len(nearmiss)
    for near, same in zip(nearmiss, samesubject, strict=True):
        assert same.id == f"{near.id}-ss"
        edit = ("prompt", "target", "subject", "rephrase", "ground_truth")
        assert [getattr(same, k) for k in edit] == [getattr(near, k) for k in edit]
        assert same.subject in same.locality_prompt
        assert same.locality_prompt not in (same.prompt, *same.rephrase)
        assert same.locality_answer not in (same.target, same.ground_truth)


def test_irrelevant_pool_parses_and_pairs_each_prompt_with_its_answer() -> None:
    lines = (DATA / "irrelevant_pool.jsonl").read_text(encoding="utf-8").splitlines()
    records = [LAYOUTS["canonical"].to_record(json.loads(line), i, LIMITS) for i, line in enumerate(lines)]
    assert len(records) == 400 and len({r.prompt for r in records}) == 400
    assert all((r.locality_prompt, r.locality_answer) == (r.prompt, r.target) for r in records)
