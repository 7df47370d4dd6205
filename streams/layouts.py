"""Known dataset layouts and their mapping onto the canonical :class:`~streams.record.EditRecord`.

A layout turns one decoded row (ZsRE, CounterFact or canonical) into a canonical dict. Row-level
problems (not an object, required key missing) raise :class:`InvalidRecordError` so the row is
dead-lettered; only :func:`detect_layout` and :func:`get_layout` raise :class:`FormatError`, because
they concern a whole source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from streams.errors import FormatError, InvalidRecordError, Issue
from streams.record import RecordLimits, StreamRecord, is_retraction, type_name, validate_mapping

logger = logging.getLogger(__name__)

Converter = Callable[[Mapping[str, Any], int], dict[str, Any]]


@dataclass(frozen=True)
class Layout:
    """One dataset layout.

    Attributes:
        name: Registry name (``"zsre"``, ``"counterfact"``, ``"canonical"``).
        required_keys: Keys every row must have.
        convert: Maps a row (already checked to be a mapping with ``required_keys``) and its position
            to a canonical dict.
        source_fields: Canonical field -> key in this layout, used to name the user's own key in errors.
    """

    name: str
    required_keys: tuple[str, ...]
    convert: Converter
    source_fields: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, row: object, index: int) -> dict[str, Any]:
        """Map one row to a canonical dict.

        Args:
            row: The decoded row.
            index: Its 0-based position in the source (used for generated ids).

        Returns:
            The canonical dict (not yet validated).

        Raises:
            InvalidRecordError: The row is not a mapping or lacks a required key of this layout.
        """
        if not isinstance(row, Mapping):
            raise InvalidRecordError.from_issues(
                [Issue(None, f"{self.name} row must be a JSON object, got {type_name(row)}")]
            )
        missing = [key for key in self.required_keys if key not in row]
        if missing:
            raise InvalidRecordError.from_issues(
                [Issue(key, f"required {self.name} key missing") for key in missing]
            )
        return self.convert(row, index)

    def to_record(self, row: object, index: int, limits: RecordLimits) -> StreamRecord:
        """Map and validate one row (the raw-size check is the caller's job).

        Args:
            row: The decoded row.
            index: Its 0-based position in the source.
            limits: Limits in force.

        Returns:
            The validated record (a row with ``"op": "retract"`` is a retraction in any layout).

        Raises:
            InvalidRecordError: The row is invalid; fields are named with this layout's own keys.
        """
        if isinstance(row, Mapping) and row.get("op", "edit") != "edit":
            return validate_mapping(row, limits)  # a retraction (or a bad op) reads alike in every layout
        canonical = self(row, index)
        try:
            return validate_mapping(canonical, limits)
        except InvalidRecordError as exc:
            raise self._renamed(exc) from None

    def _renamed(self, exc: InvalidRecordError) -> InvalidRecordError:
        # Name the key the user actually wrote ("alt (target)") so the row can be fixed at its origin.
        if not self.source_fields or not exc.issues:
            return exc
        issues = []
        for issue in exc.issues:
            head = (issue.field or "").split("[")[0].split(".")[0]
            source_key = self.source_fields.get(head)
            if issue.field and source_key and source_key != head:
                issues.append(Issue(f"{source_key} ({issue.field})", issue.message))
            else:
                issues.append(issue)
        return InvalidRecordError.from_issues(issues)


def _one_or_many(value: object) -> object:
    """ZsRE/CounterFact store a single paraphrase as a string; some exports use a list."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return value


def _zsre(row: Mapping[str, Any], index: int) -> dict[str, Any]:
    # ZsRE rows carry no id: the position in the file is the only stable handle.
    return {
        "id": f"zsre-{index}",
        "prompt": row["src"],
        "target": row["alt"],
        "subject": row.get("subject"),
        "rephrase": _one_or_many(row.get("rephrase")),
        "locality_prompt": row.get("loc"),
        "locality_answer": row.get("loc_ans"),
        "ground_truth": row.get("pred"),
    }


def _counterfact(row: Mapping[str, Any], index: int) -> dict[str, Any]:
    case_id = row["case_id"]
    if (
        isinstance(case_id, bool)
        or not isinstance(case_id, (int, str))
        or (isinstance(case_id, str) and not case_id.strip())
    ):
        raise InvalidRecordError.from_issues(
            [Issue("case_id", f"must be an int or a non-empty string, got {type_name(case_id)}")]
        )
    return {
        "id": f"cf-{case_id}",
        "prompt": row["prompt"],
        "target": row["target_new"],
        "subject": row.get("subject"),
        "rephrase": _one_or_many(row.get("rephrase_prompt")),
        "locality_prompt": row.get("locality_prompt"),
        "locality_answer": row.get("locality_ground_truth"),
        "ground_truth": row.get("ground_truth"),
    }


def _canonical(row: Mapping[str, Any], index: int) -> dict[str, Any]:
    del index  # canonical records carry their own id; a missing one is a validation error
    return dict(row)


LAYOUTS: Mapping[str, Layout] = MappingProxyType(
    {
        "zsre": Layout(
            name="zsre",
            required_keys=("src", "alt"),
            convert=_zsre,
            source_fields={
                "prompt": "src",
                "target": "alt",
                "subject": "subject",
                "rephrase": "rephrase",
                "locality_prompt": "loc",
                "locality_answer": "loc_ans",
                "ground_truth": "pred",
            },
        ),
        "counterfact": Layout(
            name="counterfact",
            required_keys=("case_id", "prompt", "target_new"),
            convert=_counterfact,
            source_fields={
                "prompt": "prompt",
                "target": "target_new",
                "subject": "subject",
                "rephrase": "rephrase_prompt",
                "locality_prompt": "locality_prompt",
                "locality_answer": "locality_ground_truth",
                "ground_truth": "ground_truth",
            },
        ),
        "canonical": Layout(name="canonical", required_keys=(), convert=_canonical),
    }
)

# Key pairs that identify a layout, checked in this order (CounterFact rows also have "prompt").
_SIGNATURES: tuple[tuple[frozenset[str], str], ...] = (
    (frozenset({"src", "alt"}), "zsre"),
    (frozenset({"target_new", "case_id"}), "counterfact"),
    (frozenset({"prompt", "target"}), "canonical"),
)


def get_layout(name: str) -> Layout:
    """Return the registered layout called ``name``.

    Args:
        name: A key of :data:`LAYOUTS`.

    Returns:
        The layout.

    Raises:
        FormatError: Unknown name; the message lists the known layouts.
    """
    try:
        return LAYOUTS[name]
    except KeyError:
        raise FormatError(f"unknown layout {name!r}; choose one of {sorted(LAYOUTS)}") from None


def match_layout(row: object) -> str | None:
    """Return the layout whose signature keys ``row`` has, or ``None`` (no exception).

    Args:
        row: A decoded row.

    Returns:
        The layout name, or ``None`` when ``row`` is not a mapping or matches no layout.
    """
    if not isinstance(row, Mapping):
        return None
    keys = set(row)
    for signature, name in _SIGNATURES:
        if signature <= keys:
            return name
    return None


def detect_layout(first_row: Mapping[str, Any]) -> str:
    """Name the layout of a source from the keys of one of its rows.

    Args:
        first_row: A representative row (for columnar sources, any mapping of the column names).

    Returns:
        ``"zsre"`` (has ``src`` and ``alt``), ``"counterfact"`` (``target_new`` and ``case_id``) or
        ``"canonical"`` (``prompt`` and ``target``).

    Raises:
        FormatError: No layout matches; the message lists the keys found and the layouts known.
    """
    name = match_layout(first_row)
    if name is None:
        found = sorted(map(str, first_row)) if isinstance(first_row, Mapping) else type_name(first_row)
        known = ", ".join(f"{layout} (keys {sorted(sig)})" for sig, layout in _SIGNATURES)
        raise FormatError(f"cannot detect the layout from row keys {found}; known layouts: {known}")
    return name


def sniff_layout(rows: Iterable[object], *, where: str, max_rows: int = 100) -> str:
    """Detect a source's layout from its first rows, tolerating a few broken ones.

    The first row that matches a layout decides; a broken first row (not an object, missing keys)
    therefore does not condemn the whole source; it is dead-lettered later like any other row.

    Args:
        rows: The source's first rows, decoded (non-objects are skipped).
        where: The source's name, for the error message.
        max_rows: How many rows to look at before giving up.

    Returns:
        The layout name; ``"canonical"`` for a source with no rows at all (or only retractions).

    Raises:
        FormatError: None of the first ``max_rows`` rows matches a layout.
    """
    first_object: Mapping[str, Any] | None = None
    seen = 0
    for row in rows:
        if is_retraction(row):
            continue  # a retraction has the same form in every layout: it says nothing about it
        name = match_layout(row)
        if name is not None:
            return name
        if first_object is None and isinstance(row, Mapping):
            first_object = row
        seen += 1
        if seen >= max_rows:
            break
    if seen == 0:
        return "canonical"
    if first_object is None:
        raise FormatError(
            f"{where}: none of the first {seen} rows is a JSON object; cannot detect the layout"
        )
    try:
        return detect_layout(first_object)
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from None
