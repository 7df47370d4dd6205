"""EditStream: rejection handling, dead letters, counters, resume and max_records."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from streams import DeadLetterFile, EditStream, IterableSource, open_source, read_dead_letters


def good(index: int) -> str:
    return json.dumps({"id": f"e{index}", "prompt": f"Question {index} is", "target": f"answer {index}"})


# One of each bad-record kind, interleaved with valid ones; the value is (line, field the reason must name).
BAD_LINES: dict[int, tuple[str, str]] = {
    1: ("{not json", "not valid JSON"),
    3: (json.dumps({"id": "e3", "target": "t"}), "prompt"),
    5: (json.dumps({"id": "e5", "prompt": "p"}), "target"),
    8: (json.dumps({"id": "e8", "prompt": "p", "target": 5}), "target"),
    10: (json.dumps({"id": "e10", "prompt": "", "target": "t"}), "prompt"),
    12: (json.dumps({"id": "e12", "prompt": "p" * 2500, "target": "t"}), "prompt"),
    14: (json.dumps({"id": "e14", "prompt": "p", "target": "t", "foo": 1}), "foo"),
    15: (json.dumps({"id": "e15", "prompt": "p", "target": "t", "rephrase": "r"}), "rephrase"),
    16: (json.dumps({"id": "e16", "prompt": "p", "target": "t", "locality_prompt": "lp"}), "locality_answer"),
    17: ("[1, 2, 3]", "JSON object"),
}
TOTAL = 18
GOOD_ALL = sorted(set(range(TOTAL)) - set(BAD_LINES))


def mixed_file(tmp_path: Path) -> Path:
    lines = [BAD_LINES[i][0] if i in BAD_LINES else good(i) for i in range(TOTAL)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_stream_delivers_all_valid_records_and_dead_letters_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead_path = tmp_path / "dead" / "rejected.jsonl"
    with caplog.at_level(logging.WARNING, logger="streams"), DeadLetterFile(dead_path) as dead:
        stream = EditStream(open_source(mixed_file(tmp_path)), dead_letter=dead)
        delivered = list(stream)
    assert [position for position, _ in delivered] == GOOD_ALL
    assert [record.id for _, record in delivered] == [f"e{i}" for i in GOOD_ALL]
    assert (stream.seen, stream.accepted, stream.rejected) == (TOTAL, len(GOOD_ALL), len(BAD_LINES))
    assert stream.next_position == TOTAL and stream.exhausted

    letters = read_dead_letters(dead_path)
    assert [letter.position for letter in letters] == sorted(BAD_LINES)
    for letter in letters:
        assert BAD_LINES[letter.position][1] in letter.reason
        assert letter.source.endswith("mixed.jsonl")
    assert letters[0].raw == "{not json"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(BAD_LINES)
    assert "position 1" in warnings[0].getMessage() and "not valid JSON" in warnings[0].getMessage()


def test_no_dead_letter_file_when_nothing_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    path.write_text("\n".join(good(i) for i in range(3)))
    dead_path = tmp_path / "rejected.jsonl"
    with DeadLetterFile(dead_path) as dead:
        assert len(list(EditStream(open_source(path), dead_letter=dead))) == 3
    assert not dead_path.exists()
    assert read_dead_letters(dead_path) == []


def test_start_yields_exactly_the_remaining_records(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    for start in range(TOTAL + 2):
        stream = EditStream(open_source(path), start=start)
        assert [position for position, _ in stream] == [p for p in GOOD_ALL if p >= start]
        assert stream.next_position == max(start, TOTAL)


def test_crash_after_any_record_then_resume_loses_and_repeats_nothing(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    for applied in range(len(GOOD_ALL) + 1):
        first = EditStream(open_source(path))
        done = [position for _, (position, _) in zip(range(applied), first, strict=False)]
        checkpoint = first.next_position  # what a job saves after applying `done`
        resumed = EditStream(open_source(path), start=checkpoint)
        assert done + [position for position, _ in resumed] == GOOD_ALL


def test_iterating_again_continues_after_break(tmp_path: Path) -> None:
    stream = EditStream(open_source(mixed_file(tmp_path)))
    head = []
    for position, _ in stream:
        head.append(position)
        if len(head) == 3:
            break
    assert head + [position for position, _ in stream] == GOOD_ALL


def test_max_records_stops_right_after_last_accepted(tmp_path: Path) -> None:
    path = mixed_file(tmp_path)
    stream = EditStream(open_source(path), max_records=4)
    delivered = [position for position, _ in stream]
    assert delivered == GOOD_ALL[:4]
    assert stream.next_position == GOOD_ALL[3] + 1
    assert stream.limit_reached and not stream.exhausted
    assert list(stream) == []  # the limit is final
    # Rows between the last accepted one and the next valid one were not consumed.
    assert stream.rejected == sum(1 for p in BAD_LINES if p < GOOD_ALL[3])
    resumed = EditStream(open_source(path), start=stream.next_position)
    assert delivered + [position for position, _ in resumed] == GOOD_ALL


def test_batches(tmp_path: Path) -> None:
    stream = EditStream(open_source(mixed_file(tmp_path)))
    batches = list(stream.batches(3))
    assert [len(batch) for batch in batches] == [3, 3, 2]
    assert [position for batch in batches for position, _ in batch] == GOOD_ALL
    with pytest.raises(ValueError, match="batch size"):
        stream.batches(0)


def test_batches_next_position_tracks_last_batch(tmp_path: Path) -> None:
    stream = EditStream(open_source(mixed_file(tmp_path)))
    batches = stream.batches(2)
    first = next(batches)
    assert stream.next_position == first[-1][0] + 1


def test_stream_over_generator_source(tmp_path: Path) -> None:
    def produce():
        for i in range(TOTAL):
            yield BAD_LINES[i][0] if i in BAD_LINES else json.loads(good(i))

    with DeadLetterFile(tmp_path / "dl.jsonl") as dead:
        stream = EditStream(IterableSource(produce(), name="gen"), dead_letter=dead, start=2)
        positions = [position for position, _ in stream]
    assert positions == [p for p in GOOD_ALL if p >= 2]
    letters = read_dead_letters(tmp_path / "dl.jsonl")
    assert [letter.position for letter in letters] == [p for p in sorted(BAD_LINES) if p >= 2]
    assert {letter.source for letter in letters} == {"gen"}


def test_invalid_arguments(tmp_path: Path) -> None:
    source = IterableSource([])
    with pytest.raises(ValueError, match="start"):
        EditStream(source, start=-1)
    with pytest.raises(ValueError, match="max_records"):
        EditStream(source, max_records=0)
