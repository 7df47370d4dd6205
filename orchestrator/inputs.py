"""One interface over the job's edit inputs: an edit file (or Python iterable), or a Kafka topic.

The job pulls records one at a time with :meth:`EditInput.next`, rejects the ones it cannot apply with
:meth:`EditInput.reject`, stores :meth:`EditInput.checkpoint_state` in every checkpoint and calls
:meth:`EditInput.after_commit` once that checkpoint is durable. For a file the state is the stream position
(a resumed run restarts there); for Kafka it is the next offset per partition of every message handed out
(accepted, duplicate or rejected), committed to the consumer group only after the checkpoint holds those
edits, so a crash re-delivers at most what came after the last checkpoint and the job skips the ids its
journal already holds: every edit is applied exactly once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator.errors import JobError
from streams import (
    DeadLetterFile,
    EditRecord,
    EditSource,
    EditStream,
    IterableSource,
    KafkaEditConsumer,
    KafkaItem,
    KafkaSettings,
    StreamRecord,
    open_source,
)

if TYPE_CHECKING:
    from orchestrator.config import JobConfig

logger = logging.getLogger(__name__)

#: Shortest interval between two consumer-lag measurements (each asks the broker for offsets).
LAG_EVERY_S = 5.0


class EditInput(Protocol):
    """What the job needs from an edit input.

    Attributes:
        rejected: Items the input rejected itself (invalid records), all dead-lettered.
        exhausted: The input has ended (a file); never true for Kafka.
        caught_up: The last read found nothing new (Kafka); the job then trains a partial last shard.
        heartbeat_s: Longest the job may go without calling :meth:`hold` or :meth:`next` (None: no limit).
        dead_letter_target: Where rejections go (a file path or a topic), for the report.
    """

    rejected: int
    exhausted: bool
    caught_up: bool
    heartbeat_s: float | None
    dead_letter_target: str

    def next(self, wait: bool) -> tuple[Any, StreamRecord] | None:
        """Return the next valid record with its position token, or None when there is none now.

        Args:
            wait: May block (up to the poll timeout) for new records; False while editors are busy.
        """

    def reject(self, token: Any, rec: StreamRecord, reason: str) -> None:
        """Dead-letter a record the job refuses (prompt too long for the model, retraction of an unknown edit)."""

    def hold(self) -> None:
        """The job reads nothing for now (backpressure): stop fetching, but stay alive."""

    def checkpoint_state(self) -> dict[str, Any]:
        """JSON-able read position of everything handed out so far, stored in the checkpoint."""

    def after_commit(self, state: dict[str, Any]) -> None:
        """A checkpoint holding ``state`` is durable: acknowledge it to the source."""

    def lag(self, force: bool = False) -> dict[str, int] | None:
        """Messages not yet checkpointed per partition, or None when not measured (not due, or a file)."""

    def close(self) -> None:
        """Release files and clients (idempotent)."""


class FileInput:
    """An :class:`~streams.EditStream` over a file or iterable, rejections to a dead-letter file.

    Args:
        source: The edit source.
        dead_letter: The dead-letter file.
        start: First position to read (the checkpointed ``position``).
    """

    heartbeat_s = None
    caught_up = False

    def __init__(self, source: EditSource, dead_letter: DeadLetterFile, start: int = 0) -> None:
        self.dead_letter = dead_letter
        self.stream = EditStream(source, dead_letter=dead_letter, start=start)
        self._it = iter(self.stream)
        self.exhausted = False
        self.dead_letter_target = str(dead_letter.path)

    @property
    def rejected(self) -> int:
        return self.stream.rejected

    def next(self, wait: bool = True) -> tuple[int, StreamRecord] | None:
        try:
            return next(self._it)
        except StopIteration:
            self.exhausted = True
            return None

    def reject(self, token: int, rec: StreamRecord, reason: str) -> None:
        self.dead_letter.write(
            position=token, source=self.stream.source.name, reason=reason, raw=rec.to_json()
        )

    def hold(self) -> None:
        pass

    def checkpoint_state(self) -> dict[str, Any]:
        return {"position": self.stream.next_position}

    def after_commit(self, state: dict[str, Any]) -> None:
        pass

    def lag(self, force: bool = False) -> dict[str, int] | None:
        return None

    def close(self) -> None:
        self.dead_letter.close()


class KafkaInput:
    """A Kafka topic read in a consumer group; offsets committed after each checkpoint.

    Messages that fail validation are dead-lettered by the consumer itself (with the reason in a header);
    the job's own rejections go to the same topic through a second producer, flushed before any commit.

    Args:
        settings: Broker, topic, group and client settings.

    Raises:
        KafkaStreamError: No broker reachable within ``settings.connect_timeout_s``, or bad client settings.
    """

    exhausted = False

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self.consumer = KafkaEditConsumer(settings)
        self._buffer: deque[KafkaItem] = deque()
        self._offsets: dict[tuple[str, int], int] = {}
        self._lag_at = 0.0
        self._closed = False
        self.rejected = 0
        self.caught_up = False
        # poll well within max.poll.interval.ms (and serve group heartbeats) while the editors are busy
        self.heartbeat_s = min(1.0, settings.poll_timeout_s)
        self.dead_letter_target = f"kafka:{settings.dead_letter_topic}"

    def next(self, wait: bool = True) -> tuple[KafkaItem, StreamRecord] | None:
        while True:
            if not self._buffer:
                if self.consumer.paused:
                    self.consumer.resume_all()
                items = self.consumer.poll(timeout_s=None if wait else 0.0)
                self.caught_up = not items
                if not items:
                    return None
                self._buffer.extend(items)
            item = self._buffer.popleft()
            key = (item.topic, item.partition)
            self._offsets[key] = max(self._offsets.get(key, 0), item.next_offset)
            if item.record is None:  # already in the dead-letter topic
                self.rejected += 1
                continue
            return item, item.record

    def reject(self, token: KafkaItem, rec: StreamRecord, reason: str) -> None:
        self.consumer.dead_letter(token, reason, rec.to_json().encode())

    def hold(self) -> None:
        if not self.consumer.paused:
            self.consumer.pause_all()
        # keeps the group membership and returns nothing while paused, except when a rebalance assigns a
        # partition inside this very poll: it may hand out a message before it is paused. Keep it for next(),
        # in order: dropping it would move the committed offset past an edit that was never applied.
        self._buffer.extend(self.consumer.poll(max_records=1, timeout_s=0.0))

    def checkpoint_state(self) -> dict[str, Any]:
        return {"offsets": [[t, p, o] for (t, p), o in sorted(self._offsets.items())]}

    def after_commit(self, state: dict[str, Any]) -> None:
        self.consumer.commit({(t, p): o for t, p, o in state["offsets"]})

    def lag(self, force: bool = False) -> dict[str, int] | None:
        now = time.monotonic()
        if not force and now - self._lag_at < LAG_EVERY_S:
            return None
        self._lag_at = now
        return {f"{t}[{p}]": n for (t, p), n in sorted(self.consumer.lag().items())}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.consumer.close()


def open_input(cfg: JobConfig, records: Iterable[Any] | None = None, position: int = 0) -> EditInput:
    """Open the job's input: the Kafka topic (from the group's committed offsets) for ``stream.kind: kafka``,
    else ``records`` or ``stream.path`` from the checkpointed ``position``.

    Raises:
        KafkaStreamError: the broker is unreachable within ``stream.connect_timeout_s``.
        SourceError, FormatError: the edit file cannot be opened in its format.
    """
    if cfg.stream.kind == "kafka":
        return KafkaInput(cfg.stream.kafka_settings())
    source = (
        IterableSource(records) if records is not None else open_source(cfg.stream.path, cfg.stream.format)  # type: ignore[arg-type]
    )
    return FileInput(source, DeadLetterFile(cfg.dead_letter_path()), start=position)


def stream_sample(cfg: JobConfig, n: int, who: str = "this benchmark") -> list:
    """The first ``n`` valid edit records of the config's stream file (benchmarks time and measure on them).

    Raises:
        ValueError: the config names no stream file, or the file holds no valid edit.
    """
    if cfg.stream.path is None:
        raise ValueError(f"{who} reads its edits from stream.path")
    records = [r for _, r in EditStream(open_source(cfg.stream.path, cfg.stream.format), max_records=n)]
    if not records:
        raise ValueError(f"{cfg.stream.path} holds no valid edit")
    return records


def irrelevant_pool(cfg: JobConfig) -> list[tuple[str, str]]:
    """Locality pairs of the records in ``irrelevant.path`` (records that are not edited): the margin loss's
    irrelevant inputs.

    Raises:
        JobError: the file holds no locality pair.
    """
    if cfg.irrelevant.path is None:
        return []
    pool: list[tuple[str, str]] = []
    for _, rec in EditStream(open_source(cfg.irrelevant.path, cfg.irrelevant.format)):
        if isinstance(rec, EditRecord) and rec.locality_prompt and rec.locality_answer:
            pool.append((rec.locality_prompt, rec.locality_answer))
        if len(pool) >= cfg.irrelevant.limit:
            break
    if not pool:
        raise JobError(f"irrelevant.path={cfg.irrelevant.path} holds no locality pairs")
    return pool
