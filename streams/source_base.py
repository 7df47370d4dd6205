"""What every edit source yields, and the shared row -> item conversion.

A source is an ordered sequence of rows. Each row has a 0-based ``position`` that is stable across
runs, so a job that checkpoints ``position + 1`` can resume with ``source.read(start=...)``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from streams.errors import InvalidRecordError
from streams.layouts import get_layout
from streams.record import (
    EditRecord,
    RecordLimits,
    RetractRecord,
    StreamRecord,
    check_record_size,
    decode_json_object,
    json_dump_row,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceItem:
    """One row of a source: either a valid record or the reason it was rejected.

    Attributes:
        position: 0-based index of the row in the source.
        record: The validated record (an edit or a retraction), or ``None`` when the row was rejected.
        error: Why the row was rejected, or ``None`` when it is valid.
        raw: The row's original text (a JSON Lines line) or its JSON dump; set for rejected rows so they
            can be dead-lettered, ``None`` for accepted ones.
    """

    position: int
    record: StreamRecord | None
    error: InvalidRecordError | None
    raw: str | None = None

    def __post_init__(self) -> None:
        if (self.record is None) == (self.error is None):
            raise ValueError("SourceItem needs exactly one of record / error")


class EditSource(ABC):
    """An ordered, re-readable sequence of edit rows.

    Attributes:
        name: Human-readable origin (usually the file path), written into dead letters.
        format: Registry name of the format that produced the source.
        layout: Layout of the rows (``"zsre"``, ``"counterfact"``, ``"canonical"``).
        limits: Record limits enforced on every row.
    """

    def __init__(self, name: str, format: str, layout: str, limits: RecordLimits) -> None:
        self.name = name
        self.format = format
        self.layout = layout
        self.limits = limits

    @property
    def num_items(self) -> int | None:
        """Number of rows when known without reading the source (for progress bars), else ``None``."""
        return None

    @abstractmethod
    def read(self, start: int = 0) -> Iterator[SourceItem]:
        """Yield the rows at positions ``>= start``, in order.

        Args:
            start: First position to yield; earlier rows are skipped without being validated.

        Returns:
            An iterator of items; invalid rows come as items with ``error`` set, never as exceptions.

        Raises:
            SourceError: The underlying storage cannot be read.
            ValueError: ``start`` is negative.
        """

    def __iter__(self) -> Iterator[SourceItem]:
        return self.read(0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, format={self.format!r}, layout={self.layout!r})"


def check_start(start: int) -> int:
    """Validate a resume position.

    Args:
        start: Requested first position.

    Returns:
        ``start`` unchanged.

    Raises:
        ValueError: ``start`` is not a non-negative int.
    """
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    return start


def _drop_nulls(row: object) -> object:
    # Columnar formats (Parquet, HF datasets) have every column in every row: a null there means the
    # field is absent, not that the user wrote null.
    if isinstance(row, Mapping):
        return {key: value for key, value in row.items() if value is not None}
    return row


def item_from_row(
    position: int,
    row: object,
    *,
    layout: str,
    limits: RecordLimits,
    raw: str | bytes | None = None,
    nulls_are_absent: bool = False,
) -> SourceItem:
    """Turn one row into a :class:`SourceItem`, catching every row-level problem.

    Args:
        position: The row's position in the source.
        row: The decoded row, or ``None`` when ``raw`` still has to be decoded.
        layout: Name of the layout of the row.
        limits: Limits in force.
        raw: The row's original JSON text, when the source has it (checked against
            ``max_record_bytes`` and decoded when ``row`` is ``None``).
        nulls_are_absent: Treat null values as missing fields (columnar sources).

    Returns:
        An item holding either the record or the error.
    """
    raw_text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    try:
        if row is None and raw is not None:
            decoded = decode_json_object(raw, limits)
        else:
            if raw_text is None:
                nbytes, raw_text = json_dump_row(row)
            else:
                nbytes = len(raw_text.encode("utf-8"))
            check_record_size(nbytes, limits)
            decoded = row
        if nulls_are_absent:
            decoded = _drop_nulls(decoded)
        record = get_layout(layout).to_record(decoded, position, limits)
    except InvalidRecordError as exc:
        return SourceItem(position=position, record=None, error=exc, raw=raw_text)
    return SourceItem(position=position, record=record, error=None)


def item_from_any(position: int, value: Any, *, layout: str, limits: RecordLimits) -> SourceItem:
    """Turn a programmatic value (dict, :class:`EditRecord` or JSON text) into an item.

    Args:
        position: The value's index in its iterable.
        value: A mapping in ``layout``, an :class:`EditRecord` or :class:`RetractRecord`, or JSON text of a row.
        layout: Layout of mapping / JSON values.
        limits: Limits in force (records are re-validated against them).

    Returns:
        An item holding either the record or the error.
    """
    if isinstance(value, (EditRecord, RetractRecord)):
        # Re-validate: the record may have been built under other limits.
        return item_from_row(position, value.to_dict(), layout="canonical", limits=limits)
    if isinstance(value, (str, bytes)):
        return item_from_row(position, None, layout=layout, limits=limits, raw=value)
    if isinstance(value, Mapping):
        return item_from_row(position, value, layout=layout, limits=limits)
    error = InvalidRecordError(
        f"item must be a mapping, an EditRecord, a RetractRecord or a JSON string, got {type(value).__name__}"
    )
    return SourceItem(position=position, record=None, error=error, raw=repr(value)[:4096])
