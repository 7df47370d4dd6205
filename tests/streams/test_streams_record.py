"""EditRecord validation and parse_record error messages."""

from __future__ import annotations

import json
import pickle

import pytest

from streams import EditRecord, InvalidRecordError, RecordLimits, parse_record

GOOD = {"id": "e1", "prompt": "The capital of France is", "target": "Lyon"}


def reason_of(raw: object, **kwargs: object) -> str:
    with pytest.raises(InvalidRecordError) as info:
        parse_record(raw, **kwargs)  # type: ignore[arg-type]
    return info.value.reason


def test_minimal_record_defaults() -> None:
    record = parse_record(GOOD)
    assert record.id == "e1"
    assert record.rephrase == ()
    assert record.portability == ()
    assert record.subject is None
    assert record.locality_text() is None


def test_full_record_round_trips_through_json() -> None:
    raw = {
        **GOOD,
        "subject": "France",
        "rephrase": ["France's capital is", "The capital city of France is"],
        "locality_prompt": "The capital of Spain is",
        "locality_answer": "Madrid",
        "portability": [{"prompt": "The river through France's capital is", "answer": "Rhone"}],
        "ground_truth": "Paris",
    }
    record = parse_record(json.dumps(raw))
    assert record.rephrase == ("France's capital is", "The capital city of France is")
    assert record.portability[0].answer == "Rhone"
    assert record.locality_text() == "The capital of Spain is Madrid"
    assert parse_record(record.to_json()) == record
    assert parse_record(record.to_dict()) == record
    assert parse_record(record.to_json().encode("utf-8")) == record
    assert hash(record) == hash(parse_record(record.to_dict()))


def test_record_is_frozen() -> None:
    record = parse_record(GOOD)
    with pytest.raises(ValueError):
        record.target = "Paris"  # type: ignore[misc]


def test_whitespace_is_kept_not_stripped() -> None:
    assert parse_record({**GOOD, "target": " Lyon"}).target == " Lyon"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"target": 5}, "target: must be a non-empty string, got int"),
        ({"target": None}, "target: must be a non-empty string, got null"),
        ({"prompt": "   "}, "prompt: must be a non-empty string, got a blank one"),
        ({"prompt": "x" * 2400}, "prompt: 2400 chars exceeds max_prompt_chars=2000"),
        ({"target": "y" * 501}, "target: 501 chars exceeds max_target_chars=500"),
        ({"foo": 1}, "unknown field 'foo'"),
        ({"rephrase": "just one"}, "rephrase: must be a list of strings, got str"),
        ({"rephrase": ["ok", 3]}, "rephrase[1]: must be a string, got int"),
        ({"rephrase": ["r"] * 17}, "rephrase: 17 items exceeds max_rephrase=16"),
        (
            {"locality_prompt": "The capital of Spain is"},
            "locality_answer: required when locality_prompt is set",
        ),
        ({"locality_answer": "Madrid"}, "locality_prompt: required when locality_answer is set"),
        ({"portability": [{"prompt": "q"}]}, "portability[0].answer: required field missing"),
        ({"portability": ["q"]}, "portability[0]: must be an object with 'prompt' and 'answer', got str"),
        ({"id": "i" * 201}, "id: 201 chars exceeds"),
        ({"id": 7}, "id: must be a non-empty string, got int"),
        ({"subject": ""}, "subject: must be a non-empty string or null"),
        ({"ground_truth": 1.5}, "ground_truth: must be a string, got float"),
    ],
)
def test_bad_field_is_named(change: dict[str, object], expected: str) -> None:
    assert expected in reason_of({**GOOD, **change})


@pytest.mark.parametrize("missing", ["id", "prompt", "target"])
def test_missing_required_field(missing: str) -> None:
    raw = {key: value for key, value in GOOD.items() if key != missing}
    assert reason_of(raw) == f"{missing}: required field missing"


def test_several_problems_joined_on_one_line() -> None:
    reason = reason_of({"id": "x", "prompt": 1, "target": 2})
    assert (
        reason == "prompt: must be a non-empty string, got int; target: must be a non-empty string, got int"
    )
    assert "\n" not in reason


def test_not_json_and_not_object() -> None:
    assert reason_of("{not json").startswith("not valid JSON: ")
    assert reason_of("[1, 2]") == "record must be a JSON object, got list"
    assert reason_of(b"\xff\xfe{").startswith("not valid")


def test_record_bytes_limit_checked_before_parsing() -> None:
    limits = RecordLimits(max_record_bytes=100)
    big = json.dumps({**GOOD, "ground_truth": "z" * 200})
    assert "exceeds max_record_bytes=100" in reason_of(big, limits=limits)
    assert "exceeds max_record_bytes=100" in reason_of(json.loads(big), limits=limits)


def test_custom_limits_apply_to_every_prompt_like_field() -> None:
    limits = RecordLimits(max_prompt_chars=10)
    raw = {**GOOD, "prompt": "short", "rephrase": ["way too long rephrase"]}
    assert "rephrase[0]: 21 chars exceeds max_prompt_chars=10" in reason_of(raw, limits=limits)
    raw = {**GOOD, "prompt": "short", "portability": [{"prompt": "way too long prompt", "answer": "a"}]}
    assert "portability[0].prompt" in reason_of(raw, limits=limits)


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_rephrase"):
        RecordLimits(max_rephrase=0)


def test_direct_construction_validates_with_default_limits() -> None:
    with pytest.raises(ValueError):
        EditRecord(id="a", prompt="p", target=5)  # type: ignore[arg-type]
    record = EditRecord(id="a", prompt="p", target="t", rephrase=["r"])  # type: ignore[arg-type]
    assert record.rephrase == ("r",)


def test_error_pickles_with_its_issues() -> None:
    with pytest.raises(InvalidRecordError) as info:
        parse_record({**GOOD, "target": 5})
    clone = pickle.loads(pickle.dumps(info.value))
    assert clone.reason == info.value.reason
    assert clone.issues == info.value.issues
    assert clone.issues[0].field == "target"


def test_op_picks_the_record_kind_and_an_unknown_op_is_named() -> None:
    from streams import RetractRecord

    assert parse_record({**GOOD, "op": "edit"}) == parse_record(GOOD)
    retraction = parse_record('{"op": "retract", "id": "e1"}')
    assert isinstance(retraction, RetractRecord) and retraction.id == "e1"
    assert parse_record(retraction.to_json()) == retraction
    assert reason_of({"op": "delete", "id": "e1"}) == "op: must be 'edit' or 'retract', got 'delete'"
    assert reason_of({"op": 1, "id": "e1"}) == "op: must be 'edit' or 'retract', got 1"
    assert reason_of({"op": "retract"}) == "id: required field missing"
    assert reason_of({"op": "retract", "id": "e1", "prompt": "p"}) == "unknown field 'prompt'"


def test_retractions_read_alike_in_every_layout_and_sources_keep_their_order(tmp_path) -> None:
    from streams import EditStream, RetractRecord, open_source
    from streams.kafka import decode_message

    rows = [{"src": "Who?", "alt": "Ann"}, {"op": "retract", "id": "0"}, {"src": "Where?", "alt": "Rome"}]
    path = tmp_path / "zsre.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [rec for _, rec in EditStream(open_source(path))]
    assert [type(r).__name__ for r in got] == ["EditRecord", "RetractRecord", "EditRecord"]
    only = tmp_path / "only.jsonl"
    only.write_text('{"op": "retract", "id": "x"}\n')
    assert [rec for _, rec in EditStream(open_source(only))] == [RetractRecord(id="x")]
    # a Kafka message keyed by the edit id it retracts (the edit's partition)
    assert decode_message(b"x", b'{"op":"retract","id":"x"}', RecordLimits())[1] == RetractRecord(id="x")
