"""Reading the edit input into the shard book, only as fast as the editors consume it.

Each record read is a duplicate (its id was accepted before: skipped), a record whose prompt the model cannot
take (dead-lettered), or accepted: appended to its shard and to the checkpoint journal. A retraction is queued
(:mod:`orchestrator.retract`) or, naming an edit not in the state, dead-lettered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from orchestrator.checkpoint import CheckpointStore
from orchestrator.config import JobConfig
from orchestrator.inputs import EditInput
from orchestrator.retract import Retractions
from orchestrator.scheduler import ShardBook
from orchestrator.telemetry.observer import JobObserver
from orchestrator.telemetry.sinks import MetricsSink
from streams import EditRecord, RetractRecord
from wise.batch import PromptTooLongError, Tokens
from wise.trainer import check_edit

logger = logging.getLogger(__name__)


class Intake:
    """Reads records until the editors have enough queued work (backpressure) or the stream ends.

    Args:
        cfg: the job configuration (``runtime`` sizes the queue, ``max_edits`` ends the stream).
        inp: the edit input.
        book: where accepted records go.
        store: whose journal records every accepted record.
        observer: told what was read.
        sink: where consumer lag goes (a Kafka input).
        tokens: the model's tokenizer, to check prompt lengths.
        templates: the editors' context templates (a prompt must fit with each of them).
        counters: the job's counters (``edits_seen``, ``duplicates_skipped``, ``dead_lettered``), updated here.
        seen_ids: ids accepted so far.
        stopping: whether the job is stopping (SIGTERM): reading stops at once.
        retractions: where retraction records are queued.

    Attributes:
        stream_done: nothing more will be read (the input is exhausted or ``max_edits`` are accepted).
    """

    def __init__(
        self,
        cfg: JobConfig,
        inp: EditInput,
        book: ShardBook,
        store: CheckpointStore,
        observer: JobObserver,
        sink: MetricsSink,
        tokens: Tokens,
        templates: Sequence[str],
        counters: dict[str, int],
        seen_ids: set[str],
        stopping: Callable[[], bool],
        retractions: Retractions,
    ) -> None:
        self.cfg = cfg
        self.input = inp
        self.book = book
        self.store = store
        self.observer = observer
        self.sink = sink
        self.tokens = tokens
        self.templates = templates
        self.counters = counters
        self.seen_ids = seen_ids
        self.stopping = stopping
        self.retractions = retractions
        self.stream_done = cfg.max_edits is not None and cfg.max_edits <= len(book.records)

    def read(self) -> None:
        """Read what the editors have room for (a Kafka stream: until it is caught up; it waits for new edits
        only while no editor is busy)."""
        cfg, inp = self.cfg, self.input
        capacity = cfg.runtime.editors * cfg.runtime.shards_per_editor
        rejected_before = inp.rejected
        new: list[EditRecord] = []
        wait = not self.book.in_flight() and not self.book.ready(True)
        while not self.stream_done and not self.stopping():
            if self.book.open_shards() >= capacity:
                inp.hold()
                break
            got = inp.next(wait)
            if got is None:
                self.stream_done = inp.exhausted
                break
            position, rec = got
            wait = False  # at most one blocking wait per call
            self.counters["edits_seen"] += 1
            if isinstance(rec, RetractRecord):
                self._retract(position, rec)
                continue
            if rec.id in self.seen_ids:
                logger.info("edit %s at position %s is already applied: skipped", rec.id, position)
                self.counters["duplicates_skipped"] += 1
                continue
            try:
                check_edit(self.tokens, self.templates, rec)
            except PromptTooLongError as err:
                self._reject(position, rec, str(err))
                continue
            self.seen_ids.add(rec.id)
            self.book.add(rec)
            new.append(rec)
            if cfg.max_edits is not None and len(self.book.records) >= cfg.max_edits:
                self.stream_done = True  # stop before reading the next record: it stays unread
        self.counters["edits_seen"] += inp.rejected - rejected_before
        self.counters["dead_lettered"] += inp.rejected - rejected_before
        self.observer.read(self.counters, new)
        if new:
            self.store.append(r.model_dump(mode="json") for r in new)

    def record_lag(self, force: bool = False) -> None:
        """Hand consumer lag per partition (messages not yet checkpointed) to the metrics sink."""
        lag = self.input.lag(force)
        if lag is not None:
            entry = {"kind": "lag", "edits": self.book.n_applied(), "time": time.time(), "lag": lag}
            self.sink.record({**entry, "lag_total": sum(lag.values())})

    def _retract(self, position: Any, rec: RetractRecord) -> None:
        """Queue a retraction after the edits accepted so far, or dead-letter it (its edit is not in the state)."""
        reason = self.retractions.refusal(rec.id, self.seen_ids, self.book.bank)
        if reason is not None:
            self._reject(position, rec, reason)
            return
        logger.info("retraction of %s at position %s queued", rec.id, position)
        self.retractions.add(rec.id, len(self.book.records))

    def _reject(self, position: Any, rec: EditRecord | RetractRecord, reason: str) -> None:
        logger.warning("edit %s at position %s rejected: %s", rec.id, position, reason)
        self.input.reject(position, rec, reason)
        self.counters["dead_lettered"] += 1
