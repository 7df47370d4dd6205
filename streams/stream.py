"""The edit stream: valid records out, rejected rows to the dead-letter file, counters for checkpoints.

Typical use::

    with DeadLetterFile(run_dir / "rejected.jsonl") as dead:
        stream = EditStream(open_source(path), dead_letter=dead, start=checkpoint.next_position)
        for batch in stream.batches(16):
            apply(batch)
            checkpoint.save(next_position=stream.next_position)

``next_position`` counts an item as consumed as soon as it is handed out, so checkpoint it only
after the edits handed out so far are applied.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from streams.deadletter import DeadLetterFile
from streams.record import StreamRecord
from streams.source_base import EditSource, SourceItem, check_start

logger = logging.getLogger(__name__)


class EditStream:
    """Iterate the valid records of a source from a resume position, dead-lettering the rest.

    Iterating yields ``(position, record)`` for valid rows only. A rejected row is logged at WARNING
    with its position and reason, written to ``dead_letter`` (when given) and counted; the stream
    goes on. Iterating again after a ``break`` continues where the previous loop stopped.

    Args:
        source: Where the rows come from.
        dead_letter: Where rejected rows go, or ``None`` to only log and count them.
        start: First position to read (a checkpointed ``next_position``).
        max_records: Stop after this many accepted records (``None``: read to the end). The row after
            the last accepted one is not read, so ``next_position`` points right after it.

    Attributes:
        seen: Rows consumed (accepted + rejected), not counting those skipped before ``start``.
        accepted: Valid records handed out.
        rejected: Rows rejected.
        next_position: Position after the last row consumed: the value to checkpoint and resume from.

    Raises:
        ValueError: ``start`` is negative or ``max_records`` is not a positive int.
    """

    def __init__(
        self,
        source: EditSource,
        *,
        dead_letter: DeadLetterFile | None = None,
        start: int = 0,
        max_records: int | None = None,
    ) -> None:
        check_start(start)
        if max_records is not None and (
            isinstance(max_records, bool) or not isinstance(max_records, int) or max_records <= 0
        ):
            raise ValueError(f"max_records must be a positive int or None, got {max_records!r}")
        self.source = source
        self.dead_letter = dead_letter
        self.start = start
        self.max_records = max_records
        self.seen = 0
        self.accepted = 0
        self.rejected = 0
        self.next_position = start
        self._items: Iterator[SourceItem] | None = None
        self._exhausted = False

    @property
    def exhausted(self) -> bool:
        """True once the source has no more rows (not set when ``max_records`` stopped the stream)."""
        return self._exhausted

    @property
    def limit_reached(self) -> bool:
        """True once ``max_records`` records have been accepted."""
        return self.max_records is not None and self.accepted >= self.max_records

    def __iter__(self) -> Iterator[tuple[int, StreamRecord]]:
        return self._records()

    def _records(self) -> Iterator[tuple[int, StreamRecord]]:
        if self._items is None:
            self._items = self.source.read(self.start)
        # Check the limit BEFORE pulling the next row, so nothing past the last accepted row is consumed.
        while not self.limit_reached:
            item = next(self._items, None)
            if item is None:
                if not self._exhausted:
                    self._exhausted = True
                    logger.info(
                        "source %s done: %d accepted, %d rejected, next_position=%d",
                        self.source.name,
                        self.accepted,
                        self.rejected,
                        self.next_position,
                    )
                return
            self.seen += 1
            self.next_position = item.position + 1
            if item.record is None:
                self._reject(item)
                continue
            self.accepted += 1
            yield item.position, item.record
        # The limit is final: release the source (e.g. its open file) now rather than at GC.
        self.close()

    def close(self) -> None:
        """Release the source's reader (open files); iterating afterwards yields nothing more."""
        if self._items is not None and hasattr(self._items, "close"):
            self._items.close()

    def _reject(self, item: SourceItem) -> None:
        reason = item.error.reason if item.error is not None else "rejected"
        self.rejected += 1
        logger.warning("rejected edit at %s position %d: %s", self.source.name, item.position, reason)
        if self.dead_letter is not None:
            self.dead_letter.write(
                position=item.position, source=self.source.name, reason=reason, raw=item.raw
            )

    def batches(self, n: int) -> Iterator[list[tuple[int, StreamRecord]]]:
        """Yield lists of up to ``n`` ``(position, record)`` pairs; only the last may be shorter.

        Args:
            n: Batch size.

        Returns:
            An iterator of non-empty batches drawn from this stream (counters advance as it goes).

        Raises:
            ValueError: ``n`` is not a positive int.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"batch size must be a positive int, got {n!r}")
        return self._batches(n)

    def _batches(self, n: int) -> Iterator[list[tuple[int, StreamRecord]]]:
        batch: list[tuple[int, StreamRecord]] = []
        for pair in self:
            batch.append(pair)
            if len(batch) == n:
                yield batch
                batch = []
        if batch:
            yield batch

    def counters(self) -> dict[str, int]:
        """Return the counters as a dict (for logs and metrics).

        Returns:
            ``seen``, ``accepted``, ``rejected`` and ``next_position``.
        """
        return {
            "seen": self.seen,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "next_position": self.next_position,
        }

    def __repr__(self) -> str:
        return f"EditStream(source={self.source!r}, {self.counters()})"
