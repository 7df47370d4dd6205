"""The ``hf`` format (local files and save_to_disk directories via ``datasets``)."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest

from streams import FormatError, open_source

datasets = pytest.importorskip("datasets")


def zsre(index: int) -> dict[str, object]:
    return {
        "subject": f"S{index}",
        "src": f"What is S{index}?",
        "pred": "old",
        "rephrase": f"Tell me what S{index} is?",
        "alt": f"new {index}",
        "loc": "nq question: who wrote hamlet",
        "loc_ans": "Shakespeare",
    }


def record_ids(source) -> list[str]:
    return [item.record.id for item in source if item.record is not None]


def test_hf_json_list_never_touches_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the hf source tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    path = tmp_path / "z.json"
    path.write_text(json.dumps([zsre(i) for i in range(3)]))
    source = open_source(path, "hf", cache_dir=tmp_path / "cache")
    assert (source.format, source.layout, source.num_items) == ("hf", "zsre", 3)
    assert record_ids(source) == ["zsre-0", "zsre-1", "zsre-2"]
    assert [item.position for item in source.read(start=2)] == [2]


def test_hf_jsonl_canonical_with_lists(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "prompt": "p", "target": "t", "rephrase": ["r1", "r2"]},
        {"id": "b", "prompt": "q", "target": "u", "rephrase": []},
        {"id": "c", "prompt": " ", "target": "u", "rephrase": []},
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    items = list(open_source(path, "hf", cache_dir=tmp_path / "cache"))
    assert items[0].record.rephrase == ("r1", "r2")
    assert items[2].error.reason == "prompt: must be a non-empty string, got a blank one"


def test_hf_csv_and_auto_csv(tmp_path: Path) -> None:
    path = tmp_path / "cf.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case_id", "prompt", "target_new", "subject"])
        writer.writeheader()
        writer.writerow({"case_id": 1, "prompt": "A speaks", "target_new": "English", "subject": "A"})
        writer.writerow({"case_id": 2, "prompt": "B speaks", "target_new": "", "subject": "B"})
        writer.writerow({"case_id": 3, "prompt": "C speaks", "target_new": "Dutch", "subject": "C"})
    for fmt in ("hf", "auto"):
        source = open_source(path, fmt, cache_dir=tmp_path / "cache")
        assert (source.format, source.layout) == ("hf", "counterfact")
        items = list(source)
        assert record_ids(items) == ["cf-1", "cf-3"]
        # CSV empty cell -> null -> absent: the row is rejected naming the user's column.
        assert "target_new" in items[1].error.reason


def test_hf_save_to_disk_dir_and_auto(tmp_path: Path) -> None:
    rows = [{"id": f"e{i}", "prompt": f"p{i}", "target": f"t{i}"} for i in range(4)]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    for fmt in ("hf", "auto"):
        source = open_source(saved, fmt)
        assert (source.format, source.layout) == ("hf", "canonical")
        assert record_ids(source.read(start=1)) == ["e1", "e2", "e3"]


def test_hf_dataset_dict_picks_train(tmp_path: Path) -> None:
    rows = [{"id": "e0", "prompt": "p", "target": "t"}]
    saved = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows * 2)}
    ).save_to_disk(str(saved))
    assert open_source(saved, "hf").num_items == 1


def test_hf_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(FormatError, match=r"extension '\.txt' is not supported"):
        open_source(text, "hf")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json at all")
    with pytest.raises(FormatError, match="broken.json"):
        open_source(broken, "hf", cache_dir=tmp_path / "cache")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(FormatError, match="cannot detect the layout"):
        open_source(unknown, "hf", cache_dir=tmp_path / "cache")
