"""File sources (JSON list, JSON Lines, Parquet), auto detection, IterableSource and source errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streams import (
    FORMATS,
    EditRecord,
    FormatError,
    IterableSource,
    RecordLimits,
    SourceError,
    SourceItem,
    open_source,
)


def canonical(index: int) -> dict[str, object]:
    return {"id": f"e{index}", "prompt": f"Question {index} is", "target": f"answer {index}"}


def zsre(index: int) -> dict[str, object]:
    return {
        "subject": f"S{index}",
        "src": f"What is S{index}?",
        "pred": "old",
        "rephrase": f"Tell me what S{index} is?",
        "alt": f"new {index}",
        "answers": ["old"],
        "loc": "nq question: who wrote hamlet",
        "loc_ans": "Shakespeare",
        "cond": "old >> new || q",
    }


def counterfact(index: int) -> dict[str, object]:
    return {
        "case_id": 100 + index,
        "prompt": f"S{index} speaks",
        "target_new": "English",
        "subject": f"S{index}",
        "ground_truth": "French",
        "rephrase_prompt": f"The language of S{index} is",
        "locality_prompt": "Rocard speaks",
        "locality_ground_truth": "French",
    }


def write_json(path: Path, rows: object) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ids(items: list[SourceItem]) -> list[str]:
    return [item.record.id for item in items if item.record is not None]


@pytest.mark.parametrize(
    ("fmt", "make", "prefix"), [("zsre", zsre, "zsre-"), ("counterfact", counterfact, "cf-")]
)
def test_layout_formats_json_and_jsonl(tmp_path: Path, fmt: str, make, prefix: str) -> None:
    rows = [make(i) for i in range(4)]
    source = open_source(write_json(tmp_path / "d.json", rows), fmt)
    items = list(source)
    assert [item.position for item in items] == [0, 1, 2, 3]
    assert all(item.error is None for item in items)
    assert source.num_items == 4 and source.layout == fmt
    assert all(i.startswith(prefix) for i in ids(items))
    lines = write_jsonl(tmp_path / "d.jsonl", [json.dumps(row) for row in rows])
    assert ids(list(open_source(lines, fmt))) == ids(items)


def test_zsre_ids_follow_file_position(tmp_path: Path) -> None:
    path = write_json(tmp_path / "z.json", [zsre(0), "not a row", zsre(2)])
    items = list(open_source(path, "zsre"))
    assert ids(items) == ["zsre-0", "zsre-2"]
    assert "zsre row must be a JSON object, got str" in items[1].error.reason
    assert items[1].raw == '"not a row"'


def test_jsonl_bad_lines_are_items_and_stream_continues(tmp_path: Path) -> None:
    lines = [
        json.dumps(canonical(0)),
        "{not json",
        json.dumps({"id": "e2", "prompt": "p"}),
        "",
        "   ",
        json.dumps(canonical(3)),
    ]
    items = list(open_source(write_jsonl(tmp_path / "c.jsonl", lines), "jsonl"))
    # Blank lines take no position: four non-blank lines, positions 0..3.
    assert [item.position for item in items] == [0, 1, 2, 3]
    assert ids(items) == ["e0", "e3"]
    assert items[1].error.reason.startswith("not valid JSON")
    assert items[1].raw == "{not json"
    assert items[2].error.reason == "target: required field missing"


def test_jsonl_read_start_skips_positions(tmp_path: Path) -> None:
    lines = [json.dumps(canonical(i)) for i in range(6)]
    lines.insert(2, "")
    source = open_source(write_jsonl(tmp_path / "c.jsonl", lines), "jsonl")
    items = list(source.read(start=4))
    assert [item.position for item in items] == [4, 5]
    assert ids(items) == ["e4", "e5"]
    assert list(source.read(start=99)) == []
    with pytest.raises(ValueError, match="start"):
        list(source.read(start=-1))


def test_jsonl_oversized_line_rejected_without_loading(tmp_path: Path) -> None:
    limits = RecordLimits(max_record_bytes=200)
    huge = json.dumps({**canonical(1), "ground_truth": "x" * 5000})
    path = write_jsonl(tmp_path / "c.jsonl", [json.dumps(canonical(0)), huge, json.dumps(canonical(2))])
    items = list(open_source(path, "jsonl", limits=limits))
    assert ids(items) == ["e0", "e2"]
    assert "exceeds max_record_bytes=200" in items[1].error.reason
    assert items[1].position == 1


def test_jsonl_with_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps(canonical(0)).encode() + b"\r\n" + json.dumps(canonical(1)).encode()
    )
    assert ids(list(open_source(path))) == ["e0", "e1"]


def write_parquet(path: Path, rows: list[dict[str, object]], row_group_size: int = 3) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def test_parquet_canonical_with_nulls_and_resume(tmp_path: Path) -> None:
    rows = [{**canonical(i), "rephrase": [f"r{i}"], "subject": None} for i in range(8)]
    rows[5]["target"] = None  # null cell == absent field -> rejected
    source = open_source(write_parquet(tmp_path / "c.parquet", rows), "parquet")
    assert source.layout == "canonical" and source.num_items == 8
    items = list(source)
    assert ids(items) == ["e0", "e1", "e2", "e3", "e4", "e6", "e7"]
    assert items[5].error.reason == "target: required field missing"
    assert items[0].record.rephrase == ("r0",)
    # start falls inside the second row group (groups of 3): 0-2 | 3-5 | 6-7
    assert [item.position for item in source.read(start=4)] == [4, 5, 6, 7]
    assert [item.position for item in source.read(start=6)] == [6, 7]
    assert list(source.read(start=8)) == []


def test_parquet_zsre_columns_detected(tmp_path: Path) -> None:
    source = open_source(write_parquet(tmp_path / "z.parquet", [zsre(i) for i in range(3)]))
    assert source.format == "parquet" and source.layout == "zsre"
    assert ids(list(source)) == ["zsre-0", "zsre-1", "zsre-2"]


def test_parquet_unknown_columns_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="cannot detect the layout"):
        open_source(write_parquet(tmp_path / "q.parquet", [{"question": "q", "answer": "a"}]), "parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(FormatError, match="bad.parquet"):
        open_source(bad)


@pytest.mark.parametrize(
    ("name", "content", "fmt", "layout"),
    [
        ("z.json", [zsre(0), zsre(1)], "zsre", "zsre"),
        ("cf.json", [counterfact(0)], "counterfact", "counterfact"),
        ("c.json", [canonical(0)], "json", "canonical"),
        ("z.jsonl", [zsre(0)], "zsre", "zsre"),
        ("cf.jsonl", [counterfact(0)], "counterfact", "counterfact"),
        ("c.jsonl", [canonical(0)], "jsonl", "canonical"),
    ],
)
def test_auto_detection_json(tmp_path: Path, name: str, content: list, fmt: str, layout: str) -> None:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        write_jsonl(path, [json.dumps(row) for row in content])
    else:
        write_json(path, content)
    source = open_source(path)
    assert (source.format, source.layout) == (fmt, layout)
    assert len(ids(list(source))) == len(content)


def test_auto_jsonl_layout_survives_broken_first_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "z.jsonl", ["{broken", json.dumps(zsre(1))])
    source = open_source(path)
    assert source.layout == "zsre"
    items = list(source)
    assert items[0].error is not None and ids(items) == ["zsre-1"]


def test_auto_parquet(tmp_path: Path) -> None:
    source = open_source(write_parquet(tmp_path / "cf.parquet", [counterfact(0)]))
    assert (source.format, source.layout) == ("parquet", "counterfact")


def test_unknown_format_lists_choices(tmp_path: Path) -> None:
    path = write_json(tmp_path / "c.json", [canonical(0)])
    with pytest.raises(FormatError) as info:
        open_source(path, "xml")
    for name in FORMATS:
        assert name in str(info.value)


def test_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(SourceError, match="nope.jsonl"):
        open_source(missing)


@pytest.mark.parametrize(
    ("name", "text", "fmt", "expected"),
    [
        ("bad.json", "{not json", "zsre", "is not valid JSON"),
        ("obj.json", '{"a": 1}', "counterfact", "must hold a JSON list"),
        ("obj.json", '{"a": 1}', "auto", "must hold a JSON list"),
        ("weird.json", '[{"question": "q"}]', "auto", "cannot detect the layout"),
        ("notes.txt", "hello", "auto", "cannot infer the format"),
    ],
)
def test_whole_file_format_errors(tmp_path: Path, name: str, text: str, fmt: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(FormatError, match=expected) as info:
        open_source(path, fmt)
    assert name in str(info.value)


def test_directory_for_a_file_format(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="is a directory"):
        open_source(tmp_path, "jsonl")


def test_iterable_source_with_generator() -> None:
    record = EditRecord(id="r", prompt="p", target="t")

    def produce() -> Iterator[object]:
        yield canonical(0)
        yield json.dumps(canonical(1))
        yield record
        yield 42
        yield {"id": "e4", "prompt": "p", "target": 5}
        yield canonical(5)

    source = IterableSource(produce(), name="my-system")
    items = list(source.read(start=1))
    assert [item.position for item in items] == [1, 2, 3, 4, 5]
    assert ids(items) == ["e1", "r", "e5"]
    assert "got int" in items[2].error.reason
    assert items[3].error.reason == "target: must be a non-empty string, got int"
    with pytest.raises(SourceError, match="one-shot"):
        source.read()


def test_iterable_source_list_is_rereadable_and_layout_aware() -> None:
    source = IterableSource([zsre(0), zsre(1)], layout="zsre")
    assert ids(list(source)) == ids(list(source.read())) == ["zsre-0", "zsre-1"]
    with pytest.raises(FormatError, match="unknown layout"):
        IterableSource([], layout="nope")


def test_iterable_source_revalidates_records_against_its_limits() -> None:
    record = EditRecord(id="r", prompt="a fairly long prompt", target="t")
    items = list(IterableSource([record], limits=RecordLimits(max_prompt_chars=5)))
    assert "prompt: 20 chars exceeds max_prompt_chars=5" in items[0].error.reason
