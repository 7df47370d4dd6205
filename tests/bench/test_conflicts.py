"""Locality probes that ask a fact the stream itself changed: found by edit prompt or by subject and pre-edit
answer, split out of a milestone's per-edit rows, and added to results written before the split was kept."""

import json

import pytest

from bench.conflicts import (
    annotate_results,
    edited_facts,
    locality_ceiling,
    locality_split,
    per_edit_conflicts,
)
from streams.record import EditRecord


def rec(i, subject, truth, loc, loc_answer, prompt=None):
    return EditRecord(
        id=f"r{i}",
        prompt=prompt or f"{subject} is made by",
        target="Fiat",
        subject=subject,
        ground_truth=truth,
        locality_prompt=loc,
        locality_answer=loc_answer,
    )


RECORDS = [
    rec(0, "Renault 8", "Renault", "Dacia Logan is made by", "Dacia"),
    # asks Renault 8's maker, expecting the answer record 0 changed: an edited fact
    rec(1, "Peugeot 504", "Peugeot", "The Renault 8 is produced by", "renault"),
    # names Renault 8 but expects another answer: another fact of an edited subject, not counted
    rec(2, "Lancia Delta", "Lancia", "Renault 8 was first sold in", "France"),
    # names only part of a subject's words: no match ("Renault" alone is no edited subject)
    rec(3, "Opel Kadett", "Opel", "Renault is based in", "Renault"),
    # its own subject and answer do not count
    rec(4, "Volvo 240", "Volvo", "Volvo 240 is made by", "Volvo", prompt="The maker of Volvo 240 is"),
    # its locality prompt is record 2's edit prompt, case and final punctuation aside
    rec(5, "Saab 900", "Saab", "LANCIA DELTA IS MADE BY?", "Lancia"),
]


def test_locality_probes_asking_an_edited_fact_are_found_by_subject_and_pre_edit_answer():
    assert edited_facts(RECORDS[:5]) == {1}
    assert edited_facts(RECORDS[1:5]) == set()


def test_the_split_counts_edit_prompts_and_edited_facts_apart():
    values = [1.0, 0.0, 1.0, 0.5, 1.0, 0.0]
    split = locality_split(values, range(6), RECORDS)
    # record 5 asks an edit prompt (and with it an edited fact: record 2 edits Lancia Delta away from Lancia)
    assert split["probes"] == 1 and split["locality_others"] == 3.5 / 5
    assert split["edited_facts"] == 2 and split["locality_unedited_facts"] == 3.5 / 4
    # the ceiling: the 4 probes on facts not edited all agree, the 2 on edited facts (records 1 and 5) keep 0.0
    assert split["locality_probes"] == 6 and split["locality_ceiling"] == pytest.approx(4 / 6)
    # every probe a conflict: no locality left to give
    assert locality_split([0.0], [1], RECORDS[:2]) == {
        "probes": 0,
        "locality_others": 0.0,
        "edited_facts": 1,
        "locality_unedited_facts": None,
        "locality_probes": 1,
        "locality_ceiling": 0.0,
    }


def test_the_ceiling_of_a_block_without_it_follows_from_its_locality_and_counts():
    values = [1.0, 0.0, 1.0, 0.5, 1.0, 0.0]
    split = locality_split(values, range(6), RECORDS)
    old = {k: split[k] for k in ("probes", "locality_others", "edited_facts", "locality_unedited_facts")}
    loc = sum(values) / len(values)
    assert locality_ceiling(old, loc, 6) == pytest.approx(split["locality_ceiling"])
    assert locality_ceiling(split, None, 0) == split["locality_ceiling"]  # a block that has it keeps it
    assert locality_ceiling({**old, "locality_unedited_facts": None}, 0.25, 6) == 0.25  # all edited facts
    assert locality_ceiling(old, None, 6) is None


def test_per_edit_rows_are_split_by_the_records_they_name_in_their_order():
    rows = [{"id": f"r{i}", "locality": v} for i, v in zip((5, 0, 1, 2), (0.0, 1.0, 0.0, 1.0), strict=True)]
    block = per_edit_conflicts(rows, RECORDS)
    assert block == locality_split([0.0, 1.0, 0.0, 1.0], range(4), [RECORDS[i] for i in (5, 0, 1, 2)])
    assert block["edited_facts"] == 2 and block["locality_unedited_facts"] == 1.0
    # rows without a locality are left out; none at all, or a record not given, gives no block
    rows.append({"id": "r3", "locality": None})
    assert per_edit_conflicts(rows, RECORDS) == block
    assert per_edit_conflicts([{"id": "r3", "locality": None}], RECORDS) is None
    assert per_edit_conflicts([{"id": "zz", "locality": 1.0}], RECORDS) is None


def test_results_without_the_block_gain_it_and_others_are_left_alone(tmp_path):
    rows = [{"id": r.id, "locality": 1.0 - (i % 2)} for i, r in enumerate(RECORDS)]
    old = {"T": 6, "teacher_forced": {"locality": 0.5}, "per_edit": rows}
    (tmp_path / "T6.json").write_text(json.dumps(old))
    kept = {"T": 2, "per_edit": rows[:2], "conflicts": {**per_edit_conflicts(rows[:2], RECORDS), "probes": 7}}
    (tmp_path / "T2.json").write_text(json.dumps(kept))
    # a block written before the split gave its ceiling is written again
    dated = {"T": 4, "per_edit": rows[:4], "conflicts": {"probes": 7, "edited_facts": 0}}
    (tmp_path / "T4.json").write_text(json.dumps(dated))
    (tmp_path / "T3.json").write_text(json.dumps({"T": 3}))  # no per-edit rows: nothing to split
    assert annotate_results(tmp_path, RECORDS) == [4, 6]
    new = json.loads((tmp_path / "T6.json").read_text())
    assert new == {**old, "conflicts": per_edit_conflicts(rows, RECORDS)}
    assert json.loads((tmp_path / "T4.json").read_text())["conflicts"] == per_edit_conflicts(
        rows[:4], RECORDS
    )
    assert json.loads((tmp_path / "T2.json").read_text()) == kept
    assert json.loads((tmp_path / "T3.json").read_text()) == {"T": 3}
    assert annotate_results(tmp_path, RECORDS) == []
