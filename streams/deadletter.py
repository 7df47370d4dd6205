"""Dead-letter file: rejected rows, one JSON object per line, durable per write.

Each line is ``{"position", "source", "reason", "raw"}``. The file is opened lazily in append mode, so
a run that rejects nothing leaves no file, and a resumed run adds to the earlier one. Every write is
flushed and fsync'd: a crash right after a rejection loses nothing.

Delivery is at-least-once: a row rejected after the last checkpoint is rejected (and written) again
when the job resumes from that checkpoint, so readers should de-duplicate on ``(source, position)``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from streams.errors import FormatError, SourceError

logger = logging.getLogger(__name__)

MAX_RAW_CHARS = 4096


@dataclass(frozen=True)
class DeadLetter:
    """One rejected row.

    Attributes:
        position: Position of the row in its source.
        source: Name of the source (usually its path).
        reason: Why it was rejected.
        raw: The row's text, truncated to :data:`MAX_RAW_CHARS` characters, or ``None``.
    """

    position: int
    source: str
    reason: str
    raw: str | None


class DeadLetterFile:
    """Append-only JSON Lines file of rejected rows.

    Args:
        path: Where to write; parent directories are created on the first write.

    Attributes:
        path: The file path.
        written: Number of dead letters written through this object.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.written = 0
        self._handle: IO[str] | None = None

    def write(self, *, position: int, source: str, reason: str, raw: str | None) -> None:
        """Append one rejected row and make it durable before returning.

        Args:
            position: Position of the row in its source.
            source: Name of the source.
            reason: Why it was rejected.
            raw: The row's text (truncated to :data:`MAX_RAW_CHARS` characters).

        Raises:
            SourceError: The file cannot be written.
        """
        entry = {
            "position": position,
            "source": source,
            "reason": reason,
            "raw": None if raw is None else raw[:MAX_RAW_CHARS],
        }
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        try:
            handle = self._open()
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        except OSError as exc:
            raise SourceError(f"cannot write dead letter to {self.path}: {exc}") from exc
        self.written += 1

    def _open(self) -> IO[str]:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a", encoding="utf-8")
        return self._handle

    def close(self) -> None:
        """Close the file if it was opened (idempotent)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> DeadLetterFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DeadLetterFile({str(self.path)!r}, written={self.written})"


def read_dead_letters(path: str | Path) -> list[DeadLetter]:
    """Read a dead-letter file back.

    A missing file means nothing was rejected and gives an empty list. A torn last line (a crash in
    the middle of a write) is skipped with a warning.

    Args:
        path: The dead-letter file.

    Returns:
        The dead letters, in file order.

    Raises:
        SourceError: The file exists but cannot be read.
        FormatError: A line other than the last is not a valid dead letter.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read dead letters from {path}: {exc}") from exc
    letters: list[DeadLetter] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            letters.append(
                DeadLetter(
                    position=int(entry["position"]),
                    source=str(entry["source"]),
                    reason=str(entry["reason"]),
                    raw=entry.get("raw"),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            if number == len(lines):
                logger.warning("%s: skipping torn last line %d (%s)", path, number, exc)
                continue
            raise FormatError(
                f"{path}, line {number}: not a dead letter ({type(exc).__name__}: {exc})"
            ) from None
    return letters
