"""The canonical edit record and its strict parser.

Every source layout (ZsRE, CounterFact, canonical JSON Lines, ...) is mapped onto :class:`EditRecord`
before anything downstream sees it. Validation is strict on purpose: a wrong type is an error, never a
silent coercion (an int ``target`` is rejected, not turned into ``"5"``), because a coerced edit would be
applied to the model and is much harder to spot afterwards than a dead-lettered row.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from streams.errors import InvalidRecordError, Issue

logger = logging.getLogger(__name__)

_LIMITS_KEY = "limits"


@dataclass(frozen=True)
class RecordLimits:
    """Size limits applied to every record.

    Attributes:
        max_prompt_chars: Longest prompt-like text (prompt, each rephrase, locality prompt, portability
            prompts), in characters.
        max_target_chars: Longest answer-like text (target, locality answer, portability answers).
        max_rephrase: Most rephrased prompts per record.
        max_record_bytes: Largest serialized record (its raw JSON, UTF-8), checked before parsing.
    """

    max_prompt_chars: int = 2000
    max_target_chars: int = 500
    max_rephrase: int = 16
    max_record_bytes: int = 64_000

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RecordLimits.{name} must be a positive int, got {value!r}")


_DEFAULT_LIMITS = RecordLimits()
_MAX_ID_CHARS = 200


def type_name(value: object) -> str:
    """Return a short, JSON-flavoured type name for error messages (``None`` is ``"null"``)."""
    return "null" if value is None else type(value).__name__


def _limits(info: ValidationInfo) -> RecordLimits:
    context = info.context
    if isinstance(context, Mapping) and isinstance(context.get(_LIMITS_KEY), RecordLimits):
        return context[_LIMITS_KEY]
    return _DEFAULT_LIMITS


def _check_text(value: str, limit: int, limit_name: str | None) -> str:
    """Reject blank or oversized text; never rewrites it (whitespace may matter to the tokenizer)."""
    if not value.strip():
        raise PydanticCustomError("blank_string", "must be a non-empty string, got a blank one")
    if len(value) > limit:
        raise PydanticCustomError(
            "text_too_long",
            "{length} chars exceeds {limit_desc}",
            {
                "length": len(value),
                "limit_desc": f"{limit_name}={limit}" if limit_name else f"the {limit}-char limit",
            },
        )
    return value


def _prompt_text(value: str, info: ValidationInfo) -> str:
    return _check_text(value, _limits(info).max_prompt_chars, "max_prompt_chars")


def _answer_text(value: str, info: ValidationInfo) -> str:
    return _check_text(value, _limits(info).max_target_chars, "max_target_chars")


def _id_text(value: str) -> str:
    return _check_text(value, _MAX_ID_CHARS, None)


# Annotated item types so that errors point at the exact item (``rephrase[3]``), not the whole field.
PromptText = Annotated[StrictStr, AfterValidator(_prompt_text)]
AnswerText = Annotated[StrictStr, AfterValidator(_answer_text)]
IdText = Annotated[StrictStr, AfterValidator(_id_text)]


def _require_sequence(value: Any, what: str) -> Any:
    # Only real JSON arrays: a lone string would otherwise be rejected with a confusing message, and a
    # set would be accepted with an arbitrary order.
    if not isinstance(value, (list, tuple)):
        raise PydanticCustomError(
            "sequence_type", "must be a list of {what}, got {got}", {"what": what, "got": type_name(value)}
        )
    return value


class PortabilityProbe(BaseModel):
    """A multi-hop question whose answer should follow from the edit.

    Attributes:
        prompt: The question.
        answer: The expected answer after the edit.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, revalidate_instances="always")

    prompt: PromptText
    answer: AnswerText


class EditRecord(BaseModel):
    """One knowledge edit: make the model answer ``prompt`` with ``target``.

    Attributes:
        id: Stable identifier (non-empty, at most 200 chars), unique within a source.
        prompt: The edit prompt.
        target: The new answer to teach.
        subject: The entity the edit is about, when known.
        rephrase: Paraphrases of ``prompt`` (generalization probes).
        locality_prompt: An unrelated prompt whose answer must not change.
        locality_answer: Its answer (``locality_prompt`` and ``locality_answer`` come together).
        portability: Multi-hop probes whose answers follow from the edit.
        ground_truth: The pre-edit fact, informational only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: IdText
    prompt: PromptText
    target: AnswerText
    subject: StrictStr | None = None
    rephrase: tuple[PromptText, ...] = ()
    locality_prompt: PromptText | None = None
    locality_answer: AnswerText | None = None
    portability: tuple[PortabilityProbe, ...] = ()
    ground_truth: StrictStr | None = None

    @field_validator("subject")
    @classmethod
    def _subject_ok(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise PydanticCustomError("blank_string", "must be a non-empty string or null, got a blank one")
        return value

    @field_validator("rephrase", mode="before")
    @classmethod
    def _rephrase_is_sequence(cls, value: Any) -> Any:
        return _require_sequence(value, "strings")

    @field_validator("portability", mode="before")
    @classmethod
    def _portability_is_sequence(cls, value: Any) -> Any:
        return _require_sequence(value, "objects with 'prompt' and 'answer'")

    @field_validator("rephrase")
    @classmethod
    def _rephrase_count_ok(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        limits = _limits(info)
        if len(value) > limits.max_rephrase:
            raise PydanticCustomError(
                "too_many",
                "{count} items exceeds max_rephrase={limit}",
                {"count": len(value), "limit": limits.max_rephrase},
            )
        return value

    @model_validator(mode="after")
    def _locality_pair(self) -> EditRecord:
        if (self.locality_prompt is None) != (self.locality_answer is None):
            given, missing = (
                ("locality_prompt", "locality_answer")
                if self.locality_prompt is not None
                else ("locality_answer", "locality_prompt")
            )
            raise PydanticCustomError(
                "locality_pair",
                "{missing}: required when {given} is set (give both or neither)",
                {"missing": missing, "given": given},
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Return the canonical, JSON-ready dict of the record (lists instead of tuples, every field).

        Returns:
            A dict that :func:`parse_record` turns back into an equal record.
        """
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        """Return the canonical JSON text of the record (one line, UTF-8 kept as is).

        Returns:
            A JSON object string that :func:`parse_record` turns back into an equal record.
        """
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    def locality_text(self) -> str | None:
        """Return the irrelevant text ``locality_prompt + " " + locality_answer``, or ``None``.

        Returns:
            The joined locality pair when the record has one, else ``None``.
        """
        if self.locality_prompt is None or self.locality_answer is None:
            return None
        return f"{self.locality_prompt} {self.locality_answer}"


class RetractRecord(BaseModel):
    """A retraction: remove the applied edit ``id`` from the state (``{"op": "retract", "id": ...}``).

    Attributes:
        op: Always ``"retract"``.
        id: The id of the edit to remove (non-empty, at most 200 chars).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["retract"] = "retract"
    id: IdText

    def to_dict(self) -> dict[str, Any]:
        """Return the canonical, JSON-ready dict (``op`` and ``id``)."""
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        """Return the canonical JSON text of the retraction (one line)."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))


#: What a stream carries: an edit, or the retraction of an earlier edit.
StreamRecord = EditRecord | RetractRecord

#: The record kinds, by the value of their ``op`` field (``edit`` when the field is absent).
OPS: Mapping[str, type[BaseModel]] = {"edit": EditRecord, "retract": RetractRecord}


def is_retraction(row: object) -> bool:
    """Whether a decoded row asks for a retraction (``"op": "retract"``); never raises."""
    return isinstance(row, Mapping) and row.get("op") == "retract"


_NON_EMPTY_FIELDS = frozenset({"id", "prompt", "target", "locality_prompt", "locality_answer"})


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _issue_from_pydantic(error: Mapping[str, Any]) -> Issue:
    loc = tuple(error.get("loc", ()))
    path = _field_path(loc) or None
    kind = error.get("type", "")
    got = type_name(error.get("input"))
    if kind == "extra_forbidden":
        return Issue(None, f"unknown field '{path}'")
    if kind == "missing":
        return Issue(path, "required field missing")
    if kind == "string_type":
        wanted = "a non-empty string" if path in _NON_EMPTY_FIELDS else "a string"
        return Issue(path, f"must be {wanted}, got {got}")
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return Issue(path, f"must be an object with 'prompt' and 'answer', got {got}")
    # Our own PydanticCustomError messages are already phrased for users; keep pydantic's otherwise.
    return Issue(path, str(error.get("msg", kind)))


def json_dump_row(row: object) -> tuple[int, str]:
    """Return the UTF-8 size and compact JSON text of a decoded row (never raises).

    Args:
        row: Any decoded row; values JSON cannot represent are written with ``str``.

    Returns:
        ``(size_in_bytes, text)``.
    """
    text = json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str)
    return len(text.encode("utf-8")), text


def check_record_size(nbytes: int, limits: RecordLimits) -> None:
    """Reject a raw record larger than ``limits.max_record_bytes``.

    Args:
        nbytes: Size of the raw JSON of the record, in bytes.
        limits: Limits in force.

    Raises:
        InvalidRecordError: The record is too large.
    """
    if nbytes > limits.max_record_bytes:
        raise InvalidRecordError.from_issues(
            [Issue(None, f"record is {nbytes} bytes, exceeds max_record_bytes={limits.max_record_bytes}")]
        )


def decode_json_object(raw: str | bytes, limits: RecordLimits) -> object:
    """Size-check and decode one JSON text (the object itself is not validated).

    Args:
        raw: JSON text, as str or UTF-8 bytes.
        limits: Limits in force (``max_record_bytes`` is checked before decoding).

    Returns:
        The decoded JSON value.

    Raises:
        InvalidRecordError: Too large, not UTF-8 or not JSON.
    """
    nbytes = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", errors="replace"))
    check_record_size(nbytes, limits)
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise InvalidRecordError.from_issues([Issue(None, f"not valid UTF-8: {exc}")]) from None
    except json.JSONDecodeError as exc:
        raise InvalidRecordError.from_issues([Issue(None, f"not valid JSON: {exc}")]) from None


def validate_mapping(data: object, limits: RecordLimits) -> StreamRecord:
    """Validate an already decoded canonical dict, without the raw-size check.

    The optional ``op`` field picks the kind: ``"edit"`` (the default) or ``"retract"``.

    Args:
        data: The decoded record; must be a mapping with the canonical fields.
        limits: Limits in force.

    Returns:
        The validated record: an :class:`EditRecord`, or a :class:`RetractRecord` for ``"op": "retract"``.

    Raises:
        InvalidRecordError: ``data`` is not a mapping, ``op`` is unknown, or any field is invalid.
    """
    if not isinstance(data, Mapping):
        raise InvalidRecordError.from_issues(
            [Issue(None, f"record must be a JSON object, got {type_name(data)}")]
        )
    bad_keys = [key for key in data if not isinstance(key, str)]
    if bad_keys:
        raise InvalidRecordError.from_issues(
            [Issue(None, f"field names must be strings, got {bad_keys[:3]!r}")]
        )
    fields = dict(data)
    op = fields.get("op", "edit")
    model = OPS.get(op) if isinstance(op, str) else None
    if model is None:
        choices = " or ".join(repr(k) for k in OPS)
        raise InvalidRecordError.from_issues([Issue("op", f"must be {choices}, got {op!r}"[:300])])
    if model is EditRecord:
        fields.pop("op", None)  # the default kind: an edit record has no op field
    try:
        return model.model_validate(fields, context={_LIMITS_KEY: limits})  # type: ignore[return-value]
    except ValidationError as exc:
        issues = [_issue_from_pydantic(error) for error in exc.errors(include_url=False)]
        raise InvalidRecordError.from_issues(issues) from None


def parse_record(
    raw: Mapping[str, Any] | str | bytes, *, limits: RecordLimits = _DEFAULT_LIMITS
) -> StreamRecord:
    """Parse one canonical record (an edit, or a retraction with ``"op": "retract"``) from a dict or its JSON
    text.

    Args:
        raw: The record as a mapping, or as JSON text (str or UTF-8 bytes).
        limits: Size limits to enforce.

    Returns:
        The validated, immutable record.

    Raises:
        InvalidRecordError: The record is too large, not JSON, not an object, has an unknown ``op``, or has a
            missing, unknown, wrongly typed, blank or oversized field. The message names every offending
            field.
    """
    if isinstance(raw, (str, bytes)):
        data = decode_json_object(raw, limits)
    else:
        check_record_size(json_dump_row(raw)[0], limits)
        data = raw
    return validate_mapping(data, limits)
