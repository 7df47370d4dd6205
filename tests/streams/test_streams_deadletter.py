"""DeadLetterFile writing and read_dead_letters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streams import DeadLetterFile, FormatError, read_dead_letters
from streams.deadletter import MAX_RAW_CHARS


def test_write_read_append_and_truncate(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dead.jsonl"
    dead = DeadLetterFile(path)
    assert not path.exists()  # opened lazily
    dead.write(position=3, source="a.jsonl", reason="target: required field missing", raw="x" * 10_000)
    # Durable before close: another reader sees the line right away.
    assert json.loads(path.read_text().splitlines()[0])["position"] == 3
    dead.close()
    with DeadLetterFile(path) as again:  # a resumed run appends
        again.write(position=9, source="a.jsonl", reason="not valid JSON: ...", raw=None)
        assert again.written == 1
    letters = read_dead_letters(path)
    assert [(letter.position, letter.reason) for letter in letters] == [
        (3, "target: required field missing"),
        (9, "not valid JSON: ..."),
    ]
    assert len(letters[0].raw) == MAX_RAW_CHARS
    assert letters[1].raw is None
    assert set(json.loads(path.read_text().splitlines()[0])) == {"position", "source", "reason", "raw"}


def test_torn_last_line_is_skipped_but_corruption_elsewhere_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dead.jsonl"
    with DeadLetterFile(path) as dead:
        dead.write(position=1, source="s", reason="r", raw="{}")
    with path.open("a") as handle:
        handle.write('{"position": 2, "sour')
    assert [letter.position for letter in read_dead_letters(path)] == [1]
    with path.open("a") as handle:
        handle.write("\n" + json.dumps({"position": 3, "source": "s", "reason": "r", "raw": None}) + "\n")
    with pytest.raises(FormatError, match="line 2"):
        read_dead_letters(path)


def test_missing_file_reads_as_empty(tmp_path: Path) -> None:
    assert read_dead_letters(tmp_path / "none.jsonl") == []
