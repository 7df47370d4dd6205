"""Exceptions raised by the ``streams`` package.

Two kinds of failure are kept apart on purpose:

* :class:`InvalidRecordError` concerns ONE row. Streams catch it, dead-letter the row and go on.
* :class:`FormatError` and :class:`SourceError` concern a whole source (unreadable file, unknown
  format, ...). They are raised to the caller, since no row of that source can be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass


class StreamError(Exception):
    """Base class of every error raised by ``streams``."""


@dataclass(frozen=True)
class Issue:
    """One problem found in a record.

    Attributes:
        field: Dotted path of the offending field (``"target"``, ``"portability[0].answer"``), or
            ``None`` when the problem concerns the record as a whole.
        message: What is wrong, without the field name (``"must be a non-empty string, got int"``).
    """

    field: str | None
    message: str

    def render(self) -> str:
        """Return the one-line ``"field: message"`` form of the issue."""
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidRecordError(StreamError, ValueError):
    """A single edit record is malformed; the row is rejected and the stream continues.

    Args:
        reason: One line naming the offending field(s) and what is wrong with them.
        issues: The individual problems ``reason`` was built from, when known.
    """

    def __init__(self, reason: str, issues: tuple[Issue, ...] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.issues = issues

    @classmethod
    def from_issues(cls, issues: list[Issue] | tuple[Issue, ...]) -> InvalidRecordError:
        """Build the error from a non-empty list of issues, joining them with ``"; "``.

        Args:
            issues: Problems found in the record.

        Returns:
            The error, whose ``reason`` lists every issue.
        """
        issues = tuple(issues)
        return cls("; ".join(issue.render() for issue in issues), issues)

    def __reduce__(self) -> tuple[type[InvalidRecordError], tuple[str, tuple[Issue, ...]]]:
        # Keep ``issues`` when the error crosses a process boundary (pickling drops kwargs otherwise).
        return (type(self), (self.reason, self.issues))


class FormatError(StreamError, ValueError):
    """A whole source, or its format/layout, cannot be understood (not JSON, unknown layout, ...)."""


class SourceError(StreamError, OSError):
    """A source cannot be opened or read (missing file, I/O failure, one-shot iterable reused)."""
