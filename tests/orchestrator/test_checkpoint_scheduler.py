"""Checkpoint store and shard bookkeeping, without Ray: torn journals, foreign checkpoints, file collection,
in-order storing of shards that finish out of order."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.checkpoint import CheckpointError, CheckpointStore
from orchestrator.scheduler import ShardBook
from streams import EditRecord
from wise.config import WiseConfig
from wise.memory import Memory, MemoryBank


def _rec(i: int) -> EditRecord:
    return EditRecord.model_validate({"id": f"r{i}", "prompt": f"prompt {i}", "target": f"t{i}"})


def _mem(shard: int, ids: list[str], value: float = 1.0) -> Memory:
    return Memory(
        torch.full((3, 4), value),
        list(ids),
        [f"p {i}" for i in ids],
        [f"t {i}" for i in ids],
        [shard],
        keys=[torch.ones(2, 4, dtype=torch.float16) * (k + 1) for k in range(len(ids))],
    )


def test_journal_is_cut_back_to_the_committed_records_and_a_torn_line_is_ignored(tmp_path):
    store = CheckpointStore(tmp_path, {"job": 1})
    assert store.load() is None and store.open_journal(0) == []
    store.append([{"id": "a"}, {"id": "b"}])
    store.commit({"accepted": 2, "bank": {"pending": [], "merged": []}, "shards": []})
    store.append([{"id": "c"}])  # read after the commit: must be read again from the stream after a crash
    store.close()
    with open(tmp_path / "journal.jsonl", "ab") as fh:
        fh.write(b'{"id": "d"')  # a torn write
    again = CheckpointStore(tmp_path, {"job": 1})
    assert again.load()["accepted"] == 2
    assert again.open_journal(2) == [{"id": "a"}, {"id": "b"}]
    again.append([{"id": "e"}])
    again.close()
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b", "e"]


def test_journal_shorter_than_the_checkpoint_is_an_error(tmp_path):
    store = CheckpointStore(tmp_path, {"job": 1})
    store.open_journal(0)
    store.append([{"id": "a"}])
    store.commit({"accepted": 1})
    store.close()
    (tmp_path / "journal.jsonl").write_text("")
    with pytest.raises(CheckpointError, match="holds 0 records, the checkpoint needs 1"):
        CheckpointStore(tmp_path, {"job": 1}).open_journal(1)


def test_checkpoint_of_another_job_names_what_differs(tmp_path):
    CheckpointStore(tmp_path, {"stream": "a.jsonl", "wise": {"layer": 3}}).commit({"accepted": 0})
    with pytest.raises(CheckpointError, match=r"another job \(differs in \['wise'\]\)"):
        CheckpointStore(tmp_path, {"stream": "a.jsonl", "wise": {"layer": 4}}).load()
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CheckpointStore(tmp_path, {"stream": "a.jsonl"}).load()


def test_memories_round_trip_and_unreferenced_files_are_collected(tmp_path):
    store = CheckpointStore(tmp_path, {"job": 1})
    m = _mem(0, ["r0", "r1"], 0.5)
    m.threshold = 1.25
    name = store.write_memory(m, "pending")
    back = store.read_memory(name)
    assert torch.equal(back.delta, m.delta) and back.edit_ids == ["r0", "r1"] and back.threshold == 1.25
    assert all(torch.equal(a, b) for a, b in zip(back.keys, m.keys, strict=True))
    partial = store.write_memory(_mem(1, ["r2"]), "shard")
    store.commit({"bank": {"pending": [name], "merged": []}, "shards": [{"shard_id": 1, "memory": partial}]})
    assert sorted(p.name for p in (tmp_path / "memories").iterdir()) == sorted([name, partial])
    store.commit({"bank": {"pending": [name], "merged": []}, "shards": []})
    assert [p.name for p in (tmp_path / "memories").iterdir()] == [name]
    with pytest.raises(CheckpointError, match="missing"):
        store.read_memory(partial)


def test_shards_finishing_out_of_order_enter_the_bank_in_order_and_merge_on_cadence():
    cfg = WiseConfig(layout="shards", save_freq=2, merge_freq=4, retrieve=False)
    book = ShardBook(2, MemoryBank(cfg))
    for i in range(5):
        book.add(_rec(i))
    assert sorted(book.tasks) == [0, 1, 2] and book.open_shards() == 2
    assert [t.shard_id for t in book.ready(stream_done=False)] == [0, 1]  # the partial shard 2 waits
    # and so does a finished stream's: shard 2 starts from the merge of shards 0 and 1 (WISE-Merge)
    assert [t.shard_id for t in book.ready(stream_done=True)] == [0, 1]
    assert book.update(1, _mem(1, ["r2", "r3"]), ()) == []  # shard 1 done first: waits for shard 0
    assert book.bank.pending == [] and book.n_applied() == 2
    assert book.update(0, _mem(0, ["r0", "r1"]), ()) == [0, 1]
    # 4 edits stored: one merge (WISE-Merge) of both shards
    assert len(book.bank.merged) == 1 and book.bank.pending == []
    assert book.bank.merged[0].edit_ids == ["r0", "r1", "r2", "r3"]
    assert book.active() is None and not book.settled()
    assert [t.shard_id for t in book.ready(stream_done=True)] == [2]
    book.update(2, _mem(2, ["r4"]), ())
    assert book.active().edit_ids == ["r4"] and book.settled()
    assert book.applied_ids() == ["r0", "r1", "r2", "r3", "r4"]


def test_wise_merge_shards_wait_for_the_earlier_groups_merge_and_retrieve_shards_do_not():
    merge = ShardBook(2, MemoryBank(WiseConfig(layout="shards", save_freq=2, merge_freq=4, retrieve=False)))
    retrieve = ShardBook(2, MemoryBank(WiseConfig(layout="shards", save_freq=2, merge_freq=4, retrieve=True)))
    for book in (merge, retrieve):
        for i in range(12):
            book.add(_rec(i))
    assert [t.shard_id for t in retrieve.ready(stream_done=True)] == [0, 1, 2, 3, 4, 5]
    assert [t.shard_id for t in merge.ready(stream_done=True)] == [0, 1]  # one group trains in parallel
    merge.update(0, _mem(0, ["r0", "r1"]), ())
    assert [t.shard_id for t in merge.ready(stream_done=True)] == [1]  # shard 1 still missing: no merge yet
    merge.update(1, _mem(1, ["r2", "r3"]), ())
    assert len(merge.bank.merged) == 1 and [t.shard_id for t in merge.ready(stream_done=True)] == [2, 3]
    # a shard under way continues whatever happened since it started
    merge.update(2, _mem(2, ["r4"]), ())
    merge.reset(3)
    assert [t.shard_id for t in merge.ready(stream_done=True)] == [2, 3]


def test_progress_that_is_not_a_prefix_of_the_shard_is_refused():
    book = ShardBook(2, MemoryBank(WiseConfig(layout="shards", save_freq=2, merge_freq=2)))
    book.add(_rec(0))
    book.add(_rec(1))
    with pytest.raises(ValueError, match="expected"):
        book.update(0, _mem(0, ["r1"]), ())
    book.update(0, _mem(0, ["r0"]), ())
    book.reset(0)
    assert book.tasks[0].applied == 0 and book.tasks[0].worker is None
