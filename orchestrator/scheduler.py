"""Shard bookkeeping of a job, independent of where shards are trained.

Accepted records are numbered in stream order; shard ``s`` holds records ``[s*F, (s+1)*F)`` with
``F = wise.save_freq``, so shards are fixed by the stream alone and can be trained anywhere, in any order, any
number of times (a retrained shard gives the same memory). Finished shards enter the
:class:`~wise.memory.MemoryBank` strictly in shard order, which applies the merge cadence exactly as the
single-process editor does. Only the last shard may hold fewer than ``F`` records: at the end of a stream it is
the *active* shard, routable but not stored, as in :class:`~wise.editor.WiseEditor`. WISE-Merge shards start
from the merge of the earlier groups, so a group's shards start only once the group before it is merged: they
train in parallel with each other, not with the next group.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from streams import EditRecord
from wise.memory import Memory, MemoryBank
from wise.trainer import EditOutcome


@dataclass
class ShardTask:
    """A shard not yet stored in the bank."""

    shard_id: int
    start: int  # index of its first record among accepted records
    records: list[EditRecord] = field(default_factory=list)
    progress: Memory | None = None  # side memory so far (CPU), None = nothing applied
    worker: int | None = None  # editor it is in flight on
    last_worker: int | None = None  # editor that last trained it (it caches the shard)

    @property
    def applied(self) -> int:
        return 0 if self.progress is None else len(self.progress.edit_ids)


class ShardBook:
    """Assigns accepted records to shards, tracks their progress, and stores finished shards in order.

    Args:
        save_freq: edits per shard.
        bank: where finished shards go.
        first_shard: the first shard id not yet in ``bank`` (resuming).

    Attributes:
        merges: merges run by storing shards (this book's lifetime: the current run).
        on_merge: called with the seconds of each merge (the merge-duration metric).
    """

    def __init__(self, save_freq: int, bank: MemoryBank, first_shard: int = 0) -> None:
        self.save_freq = save_freq
        self.bank = bank
        self.records: list[EditRecord] = []
        self.tasks: dict[int, ShardTask] = {}
        self.next_store = first_shard
        self.outcomes = 0
        self.steps = 0
        self.merges = 0
        self.on_merge: Callable[[float], None] | None = None

    # ------------------------------------------------------------------ records
    def add(self, rec: EditRecord) -> None:
        """Append an accepted record to its shard."""
        index = len(self.records)
        self.records.append(rec)
        sid = index // self.save_freq
        task = self.tasks.get(sid)
        if task is None:
            task = self.tasks[sid] = ShardTask(sid, sid * self.save_freq)
        task.records.append(rec)

    def resume(self, records: list[EditRecord], progress: Mapping[int, Memory]) -> None:
        """Continue a checkpointed run: ``records`` are all accepted records in stream order (the stored
        shards' first), ``progress`` the side memory so far of each shard under way."""
        stored = self.next_store * self.save_freq
        self.records = records[:stored]
        for rec in records[stored:]:
            self.add(rec)
        for sid, memory in progress.items():
            self.tasks[sid].progress = memory

    def full(self, task: ShardTask) -> bool:
        return len(task.records) == self.save_freq

    def open_shards(self) -> int:
        """Full shards not yet finished: the work queued or running (what backpressure limits)."""
        return sum(1 for t in self.tasks.values() if self.full(t) and t.applied < self.save_freq)

    def startable(self, task: ShardTask) -> bool:
        """Whether the shard's starting point is known: always for WISE-Retrieve and for shards under way; for
        a fresh WISE-Merge shard, once every shard of the earlier merge groups is stored (it starts from their
        merge, :meth:`~wise.memory.MemoryBank.base`)."""
        return task.progress is not None or self.bank.startable(task.shard_id, self.next_store)

    def ready(self, stream_done: bool) -> list[ShardTask]:
        """Shards with edits to apply, not in flight and :meth:`startable`, lowest id first. The last, partial
        shard is ready only once the stream has nothing more for it."""
        out = []
        for sid in sorted(self.tasks):
            t = self.tasks[sid]
            if (
                t.worker is None
                and t.applied < len(t.records)
                and (self.full(t) or stream_done)
                and self.startable(t)
            ):
                out.append(t)
        return out

    def in_flight(self) -> list[ShardTask]:
        return [t for t in self.tasks.values() if t.worker is not None]

    def next_group(self, worker: int, stream_done: bool, size: int) -> list[ShardTask]:
        """Up to ``size`` :meth:`ready` shards for ``worker``: the ones it trained last first (it caches them),
        then the lowest ids."""
        ready = self.ready(stream_done)
        ready.sort(key=lambda t: (t.last_worker != worker, t.shard_id))
        return ready[:size]

    def assign(self, tasks: list[ShardTask], worker: int) -> None:
        """``tasks`` are in flight on ``worker``."""
        for t in tasks:
            t.worker = t.last_worker = worker

    def release(self, shard_id: int) -> None:
        """The shard's editor call returned: it is no longer in flight."""
        self.tasks[shard_id].worker = None

    # ------------------------------------------------------------------ progress
    def update(self, shard_id: int, memory: Memory, outcomes: tuple[EditOutcome, ...]) -> list[int]:
        """Record a shard's progress; store every shard that is now finished and next in order.

        Returns:
            Ids of the shards stored into the bank by this call (in order).

        Raises:
            ValueError: the memory does not hold a prefix of the shard's records.
        """
        task = self.tasks[shard_id]
        expected = [r.id for r in task.records[: len(memory.edit_ids)]]
        if memory.edit_ids != expected:
            raise ValueError(
                f"shard {shard_id}: progress holds {memory.edit_ids[:3]}..., expected {expected[:3]}..."
            )
        task.progress = memory
        self.outcomes += len(outcomes)
        self.steps += sum(o.steps for o in outcomes)
        stored = []
        while (t := self.tasks.get(self.next_store)) is not None and t.applied == self.save_freq:
            assert t.progress is not None
            t0 = time.perf_counter()
            if self.bank.store(t.progress):
                self.merges += 1
                if self.on_merge is not None:
                    self.on_merge(time.perf_counter() - t0)
            del self.tasks[t.shard_id]
            stored.append(t.shard_id)
            self.next_store += 1
        return stored

    def reset(self, shard_id: int) -> int:
        """Forget a shard's progress: it is retrained from its first edit (its editor died).

        Returns:
            The number of applied edits forgotten.
        """
        task = self.tasks[shard_id]
        forgotten = task.applied
        task.progress = None
        task.worker = None
        return forgotten

    # ------------------------------------------------------------------ views
    def applied_ids(self) -> list[str]:
        """Ids written into any memory (stored, finished or in progress), in shard order."""
        ids = self.bank.edit_ids()
        for sid in sorted(self.tasks):
            p = self.tasks[sid].progress
            ids += p.edit_ids if p is not None else []
        return ids

    def in_progress(self) -> list[tuple[int, Memory]]:
        """Shards under way with at least one edit applied, and their side memory so far, lowest id first."""
        out = []
        for sid in sorted(self.tasks):
            t = self.tasks[sid]
            if t.progress is not None and t.applied:
                out.append((sid, t.progress))
        return out

    def open_records(self) -> list[EditRecord]:
        """Accepted records of the shards not stored yet, in stream order."""
        return [r for t in self.tasks.values() for r in t.records]

    def n_applied(self) -> int:
        return self.bank.n_edits() + sum(t.applied for t in self.tasks.values())

    def active(self) -> Memory | None:
        """The last shard's progress when it is partial and all its records are applied (end of a stream)."""
        if not self.tasks:
            return None
        if len(self.tasks) > 1:
            return None
        (task,) = self.tasks.values()
        if task.applied == len(task.records) and not self.full(task):
            return task.progress
        return None

    def settled(self) -> bool:
        """Everything accepted is applied and every full shard is stored."""
        return all(not self.full(t) and t.applied == len(t.records) for t in self.tasks.values())
