"""What a checkpoint of the job holds (:func:`checkpoint_state`), and the job rebuilt from one (:func:`restore`).

The state is JSON: the input's read position (a file position or Kafka offsets), how many records were accepted
(the journal's first ``accepted`` lines), the first shard not stored yet, the editors' setup (templates and
margins), the memory files of the bank (with the superseded and retracted ids) and of the shards under way, the
retractions read but not applied yet, the counters, the retention measurements and the version last published.
Restoring reads it back into a bank and a shard book exactly as they were at that commit; the shards under way
continue from their saved memories.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.checkpoint import CheckpointStore
from orchestrator.config import JobConfig
from orchestrator.scheduler import ShardBook
from streams import EditRecord
from wise.factory import make_bank
from wise.memory import MemoryBank

logger = logging.getLogger(__name__)


def job_identity(cfg: JobConfig, python_records: bool) -> dict[str, Any]:
    """What makes a checkpoint this job's (:class:`~orchestrator.checkpoint.CheckpointStore` refuses another's):
    the edit source and the settings that shape the state."""
    if cfg.stream.kind == "kafka":  # not the bootstrap address: the same topic may move
        stream: Any = {"kind": "kafka", "topic": cfg.stream.topic, "group": cfg.stream.group}
    else:
        stream = "<python iterable>" if python_records else cfg.stream.path
    return {
        "stream": stream,
        "model": cfg.model.name,
        "dtype": cfg.model.dtype,
        "wise": cfg.wise.model_dump(mode="json"),
        "irrelevant": cfg.irrelevant.model_dump(mode="json"),
    }


@dataclass
class Restored:
    """The job as of its last checkpoint (a fresh job when there is none).

    Attributes:
        bank: stored and merged memories.
        book: accepted records by shard, with the progress of the shards under way.
        seen_ids: ids of every accepted record (a later copy of one is a duplicate).
        counters: ``edits_seen``, ``duplicates_skipped``, ``dead_lettered``, ``actor_failures``.
        evaluations: the retention measurements so far.
        setup: the editors' templates and margins, None until the first editor derives them.
        published_version: the version last published to the serving replicas.
        position: where a file input continues (records read so far).
        retractions: retractions read but not applied yet (:meth:`~orchestrator.retract.Retractions.state`).
        resumed_from: the report's ``resumed_from``; None for a fresh job.
    """

    bank: MemoryBank
    book: ShardBook
    seen_ids: set[str]
    counters: dict[str, int]
    evaluations: list[dict]
    setup: dict | None = None
    published_version: int = 0
    position: int = 0
    retractions: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: dict[str, Any] | None = None


def restore(store: CheckpointStore, cfg: JobConfig) -> Restored:
    """Load the committed checkpoint in ``store`` (if any) and open its journal for appending.

    Raises:
        CheckpointError: the checkpoint is unreadable, another job's, or references missing files.
    """
    ckpt = store.load()
    bank = make_bank(cfg.wise)
    counters = {"duplicates_skipped": 0, "dead_lettered": 0, "edits_seen": 0, "actor_failures": 0}
    journal = store.open_journal(ckpt["accepted"] if ckpt else 0)
    records = [EditRecord.model_validate(r) for r in journal]
    seen_ids = {r.id for r in records}
    if ckpt is None:
        book = ShardBook(cfg.wise.save_freq, bank)
        book.resume(records, {})
        return Restored(bank, book, seen_ids, counters, [])
    bank.restore(
        [store.read_memory(n) for n in ckpt["bank"]["pending"]],
        [store.read_memory(n) for n in ckpt["bank"]["merged"]],
    )
    bank.superseded = list(ckpt["bank"].get("superseded", []))
    bank.retracted = list(ckpt["bank"].get("retracted", []))
    book = ShardBook(cfg.wise.save_freq, bank, first_shard=ckpt["next_store"])
    book.resume(records, {s["shard_id"]: store.read_memory(s["memory"]) for s in ckpt["shards"]})
    counters.update(ckpt["counters"])
    position = ckpt.get("position", 0)
    logger.info(
        "resuming from %s: %d records accepted, %d applied, stream position %d",
        store.dir,
        len(records),
        book.n_applied(),
        position,
    )
    return Restored(
        bank,
        book,
        seen_ids,
        counters,
        ckpt.get("evaluations", []),
        setup=ckpt["setup"],
        published_version=ckpt.get("published_version", 0),
        position=position,
        retractions=ckpt.get("retractions", []),
        resumed_from={
            "position": position if cfg.stream.kind == "file" else ckpt.get("offsets"),
            "records": len(records),
            "edits_applied": book.n_applied(),
            "committed_at": ckpt["time"],
        },
    )


def checkpoint_state(
    store: CheckpointStore,
    position: dict[str, Any],
    book: ShardBook,
    bank: MemoryBank,
    setup: dict | None,
    counters: dict[str, int],
    evaluations: list[dict],
    published_version: int,
    retractions: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The state to commit, after writing the memory files it references that are not on disk yet.

    Args:
        store: where the memory files go.
        position: the input's read position (:meth:`~orchestrator.inputs.EditInput.checkpoint_state`).
        book: accepted records and the shards under way.
        bank: stored and merged memories.
        setup: the editors' templates and margins.
        counters: the job's counters.
        evaluations: the retention measurements so far.
        published_version: the version last published (0 without serving).
        retractions: retractions read but not applied yet (:meth:`~orchestrator.retract.Retractions.state`).
    """
    shards = [
        {"shard_id": sid, "memory": store.write_memory(mem, "shard")} for sid, mem in book.in_progress()
    ]
    return {
        "time": time.time(),
        **position,
        "accepted": len(book.records),
        "next_store": book.next_store,
        "setup": setup,
        "bank": {
            "pending": [store.write_memory(m, "pending") for m in bank.pending],
            "merged": [store.write_memory(m, "merged") for m in bank.merged],
            "superseded": list(bank.superseded),
            "retracted": list(bank.retracted),
        },
        "shards": shards,
        "counters": counters,
        "evaluations": evaluations,
        "published_version": published_version,
        "retractions": list(retractions),
    }
