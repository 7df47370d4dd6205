"""Edit sources backed by local files: JSON lists, JSON Lines and Parquet.

Whole-file problems (not JSON, not a list, not Parquet) raise :class:`FormatError` when the source is
opened; row problems become rejected :class:`SourceItem` s and never stop the stream.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from streams.errors import FormatError, InvalidRecordError, Issue, SourceError
from streams.layouts import detect_layout, get_layout, sniff_layout
from streams.record import RecordLimits
from streams.source_base import EditSource, SourceItem, check_start, item_from_row

logger = logging.getLogger(__name__)

_UTF8_BOM = b"\xef\xbb\xbf"
_DRAIN_CHUNK = 1 << 20
_SNIFF_LINES = 100
_PARQUET_BATCH = 1024


class JsonListSource(EditSource):
    """A JSON file holding one list of rows (the ZsRE / CounterFact distribution format).

    The list is loaded once when the source is opened and kept: JSON has no streaming reader in the
    standard library, and keeping it makes ``read(start)`` free of a second parse. Use JSON Lines for
    files too large for memory.

    Args:
        path: The file.
        layout: Layout of the rows, or ``None`` to detect it from the first rows.
        limits: Record limits.
        format: Registry name reported in :attr:`format`.

    Raises:
        SourceError: The file cannot be read.
        FormatError: The file is not JSON, not a list, or its layout cannot be detected.
    """

    def __init__(self, path: Path, *, layout: str | None, limits: RecordLimits, format: str) -> None:
        try:
            with path.open("rb") as handle:
                data = json.load(handle)
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(
                f"{path} is not valid JSON ({exc}); if it is JSON Lines, name it *.jsonl or pass format='jsonl'"
            ) from None
        if not isinstance(data, list):
            raise FormatError(f"{path} must hold a JSON list of records, got a JSON {type(data).__name__}")
        layout = layout or sniff_layout(data, where=str(path))
        get_layout(layout)
        super().__init__(str(path), format, layout, limits)
        self._rows = data

    @property
    def num_items(self) -> int | None:
        """Number of rows in the list."""
        return len(self._rows)

    def read(self, start: int = 0) -> Iterator[SourceItem]:
        """Yield the rows at positions ``>= start`` (see :meth:`EditSource.read`)."""
        check_start(start)
        for position in range(start, len(self._rows)):
            yield item_from_row(position, self._rows[position], layout=self.layout, limits=self.limits)


def _next_line(handle: BinaryIO, cap: int) -> tuple[bytes, int] | None:
    """Read one line, keeping at most ``cap`` bytes; return ``(kept_bytes, full_size)`` or ``None`` at EOF.

    A line longer than ``cap`` is drained in chunks instead of being loaded whole, so one corrupt
    multi-GB line cannot exhaust memory.
    """
    line = handle.readline(cap)
    if not line:
        return None
    size = len(line)
    if len(line) == cap and not line.endswith(b"\n"):
        while True:
            chunk = handle.readline(_DRAIN_CHUNK)
            size += len(chunk)
            if not chunk or chunk.endswith(b"\n"):
                break
    return line, size


class JsonlSource(EditSource):
    """A JSON Lines file, read line by line (never loaded whole).

    Positions count non-blank lines only: blank (whitespace-only) lines are skipped and take no
    position, so adding blank lines never shifts a checkpoint. A line that is not JSON is a rejected
    item at its position; the stream continues.

    Args:
        path: The file.
        layout: Layout of the rows, or ``None`` to detect it from the first parseable lines.
        limits: Record limits (a line longer than ``max_record_bytes`` is rejected unparsed).
        format: Registry name reported in :attr:`format`.

    Raises:
        SourceError: The file cannot be read.
        FormatError: ``layout`` is ``None`` and none of the first lines matches a layout.
    """

    def __init__(self, path: Path, *, layout: str | None, limits: RecordLimits, format: str) -> None:
        super().__init__(str(path), format, layout or "canonical", limits)
        self._path = path
        if layout is None:
            self.layout = sniff_layout(self._sniff_rows(), where=str(path))
        get_layout(self.layout)

    def _sniff_rows(self) -> list[object]:
        rows: list[object] = []
        for _, line, _ in itertools.islice(self._lines(), _SNIFF_LINES):
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a broken line is dead-lettered later; it says nothing about the layout
        return rows

    def _lines(self) -> Iterator[tuple[int, bytes, int]]:
        """Yield ``(position, line_without_newline, full_size)`` for every non-blank line."""
        cap = self.limits.max_record_bytes + 2  # room for "\r\n"
        position = 0
        try:
            with self._path.open("rb") as handle:
                first = True
                while (read := _next_line(handle, cap)) is not None:
                    line, size = read
                    if first:
                        line, first = line.removeprefix(_UTF8_BOM), False
                    if size <= cap and not line.strip():
                        continue
                    yield position, line.rstrip(b"\r\n"), size
                    position += 1
        except OSError as exc:
            raise SourceError(f"cannot read {self._path} (at position {position}): {exc}") from exc

    def read(self, start: int = 0) -> Iterator[SourceItem]:
        """Yield the lines at positions ``>= start`` (see :meth:`EditSource.read`)."""
        check_start(start)
        cap = self.limits.max_record_bytes + 2
        for position, line, size in self._lines():
            if position < start:
                continue
            if size > cap:
                issue = Issue(
                    None, f"record is {size} bytes, exceeds max_record_bytes={self.limits.max_record_bytes}"
                )
                raw = line[:4096].decode("utf-8", errors="replace")
                yield SourceItem(position, None, InvalidRecordError.from_issues([issue]), raw)
                continue
            yield item_from_row(position, None, layout=self.layout, limits=self.limits, raw=line)


class ParquetSource(EditSource):
    """A Parquet file whose columns are the keys of a layout (canonical, ZsRE or CounterFact).

    Rows are read in batches; ``read(start)`` skips whole row groups before ``start``. Null cells count
    as absent fields.

    Args:
        path: The file.
        layout: Layout of the rows, or ``None`` to detect it from the column names.
        limits: Record limits.
        format: Registry name reported in :attr:`format`.

    Raises:
        SourceError: The file cannot be read.
        FormatError: The file is not Parquet, or its columns match no layout.
    """

    def __init__(self, path: Path, *, layout: str | None, limits: RecordLimits, format: str) -> None:
        try:
            with pq.ParquetFile(path) as parquet:
                metadata = parquet.metadata
                columns = parquet.schema_arrow.names
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc}") from exc
        except pa.ArrowException as exc:
            raise FormatError(f"{path} is not a readable Parquet file: {exc}") from None
        try:
            layout = layout or detect_layout(dict.fromkeys(columns))
        except FormatError as exc:
            raise FormatError(f"{path}: {exc}") from None
        get_layout(layout)
        super().__init__(str(path), format, layout, limits)
        self._path = path
        self._group_rows = [metadata.row_group(index).num_rows for index in range(metadata.num_row_groups)]

    @property
    def num_items(self) -> int | None:
        """Number of rows in the file (from its metadata)."""
        return sum(self._group_rows)

    def read(self, start: int = 0) -> Iterator[SourceItem]:
        """Yield the rows at positions ``>= start`` (see :meth:`EditSource.read`)."""
        check_start(start)
        first_group, position = 0, 0
        # Jump straight to the row group holding ``start`` instead of decoding everything before it.
        while first_group < len(self._group_rows) and position + self._group_rows[first_group] <= start:
            position += self._group_rows[first_group]
            first_group += 1
        if first_group == len(self._group_rows):
            return
        try:
            with pq.ParquetFile(self._path) as parquet:
                groups = list(range(first_group, len(self._group_rows)))
                for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH, row_groups=groups):
                    for row in batch.to_pylist():
                        if position >= start:
                            yield item_from_row(
                                position, row, layout=self.layout, limits=self.limits, nulls_are_absent=True
                            )
                        position += 1
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"cannot read {self._path} (at position {position}): {exc}") from exc
