"""Kafka settings, the message format, errors and topic administration shared by consumer and producer.

Message format: one canonical :class:`~streams.record.EditRecord` (or :class:`~streams.record.RetractRecord`)
per message, its value the JSON of :meth:`~streams.record.EditRecord.to_json` and its key the edit id (UTF-8):
a retraction carries the id of the edit it removes, so it lands in that edit's partition, after it. Values are validated exactly like
a canonical JSON Lines row (:func:`~streams.record.parse_record`, same :class:`RecordLimits`); a key that is
not UTF-8 or differs from the record's ``id`` is a rejection too, while a missing key is accepted. A
rejected message goes to the dead-letter topic unchanged (same key and value) with the headers
:data:`HEADER_REASON`, :data:`HEADER_SOURCE_TOPIC`, :data:`HEADER_SOURCE_PARTITION` and
:data:`HEADER_SOURCE_OFFSET` (UTF-8 text). :mod:`streams.kafka_consumer` reads such a topic in a consumer
group and :mod:`streams.kafka_produce` fills one from any supported edit file.

Everything in ``KafkaSettings.client`` (``security.protocol``, ``sasl.*``, ``ssl.*``, ...) is passed verbatim
to every librdkafka client this package creates, so a secured cluster needs no code change.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from streams.errors import InvalidRecordError, Issue, StreamError
from streams.record import RecordLimits, StreamRecord, parse_record

logger = logging.getLogger(__name__)

# librdkafka's own log lines go through this logger instead of stderr (served on poll/flush).
RDKAFKA_LOGGER = logging.getLogger(f"{__name__}.rdkafka")

ClientValue = StrictStr | StrictBool | StrictInt | StrictFloat

# Keys wisestream sets itself: overriding them would break the delivery guarantees (an auto-commit could
# commit offsets whose edits are not checkpointed yet) or contradict another setting.
RESERVED_CLIENT_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "bootstrap.servers": "use stream.bootstrap",
        "group.id": "use stream.group",
        "enable.auto.commit": "offsets are committed only after the edits are checkpointed",
        "queued.min.messages": "use stream.max_prefetch",
    }
)

#: Headers of a dead-lettered message.
HEADER_REASON = "reason"
HEADER_SOURCE_TOPIC = "source.topic"
HEADER_SOURCE_PARTITION = "source.partition"
HEADER_SOURCE_OFFSET = "source.offset"

_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
DEAD_LETTER_SUFFIX = ".dead-letter"


class KafkaStreamError(StreamError):
    """The Kafka cluster cannot be used: unreachable broker, failed commit or delivery, bad client setting.

    Args:
        message: What failed; always names the bootstrap address when a broker is involved.
    """


def check_topic_name(name: str) -> str:
    """Validate a Kafka topic name (letters, digits, ``.``, ``_``, ``-``; at most 249 characters).

    Args:
        name: The topic name.

    Returns:
        ``name`` unchanged.

    Raises:
        ValueError: The name is not a valid topic name.
    """
    if not isinstance(name, str) or not _TOPIC_RE.match(name) or name in {".", ".."}:
        raise ValueError(
            f"{name!r} is not a valid Kafka topic name (1-249 characters from [A-Za-z0-9._-], not '.' or '..')"
        )
    return name


def _check_client(value: dict[str, Any], field: str) -> dict[str, Any]:
    for key in value:
        if key in RESERVED_CLIENT_KEYS:
            raise ValueError(f"{field}.{key} is set by wisestream ({RESERVED_CLIENT_KEYS[key]}); remove it")
    return value


class KafkaSettings(BaseModel):
    """Where and how to read a Kafka edit stream (``stream.kind: kafka``).

    Attributes:
        bootstrap: Comma-separated ``host:port`` list of brokers.
        topic: Topic holding the edit records.
        group: Consumer group; committed offsets are kept per group.
        dead_letter_topic: Where rejected messages go; empty or ``None`` (the default) means
            ``f"{topic}.dead-letter"``.
        client: Extra librdkafka settings for every client (consumer, dead-letter producer, admin), e.g.
            ``security.protocol``, ``sasl.mechanism``, ``sasl.username``, ``ssl.ca.location``.
        consumer_client: Extra librdkafka settings for the consumer only (``session.timeout.ms``,
            ``max.poll.interval.ms``, ``auto.offset.reset``, ...).
        poll_timeout_s: Default time ``poll`` waits for the first message.
        connect_timeout_s: Bounded retry window: how long the broker may be unreachable (at start-up or
            later) before :class:`KafkaStreamError` is raised; also bounds flushes and admin calls.
        max_prefetch: Messages per partition librdkafka keeps buffered ahead of ``poll``
            (``queued.min.messages``) and the default ``max_records`` of ``poll``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bootstrap: StrictStr
    topic: StrictStr
    group: StrictStr
    dead_letter_topic: StrictStr = ""
    client: dict[StrictStr, ClientValue] = Field(default_factory=dict)
    consumer_client: dict[StrictStr, ClientValue] = Field(default_factory=dict)
    poll_timeout_s: float = Field(1.0, gt=0)
    connect_timeout_s: float = Field(30.0, gt=0)
    max_prefetch: int = Field(1000, ge=1)

    @field_validator("dead_letter_topic", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any) -> Any:
        return "" if value is None else value

    @field_validator("bootstrap", "group")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty string")
        return value

    @field_validator("topic")
    @classmethod
    def _topic_ok(cls, value: str) -> str:
        return check_topic_name(value)

    @field_validator("dead_letter_topic")
    @classmethod
    def _dead_letter_topic_ok(cls, value: str) -> str:
        return check_topic_name(value) if value else value

    @field_validator("client")
    @classmethod
    def _client_ok(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_client(value, "client")

    @field_validator("consumer_client")
    @classmethod
    def _consumer_client_ok(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_client(value, "consumer_client")

    @model_validator(mode="after")
    def _distinct_topics(self) -> KafkaSettings:
        if not self.dead_letter_topic:
            # Frozen model: fill the derived default in place, once, during validation.
            object.__setattr__(
                self, "dead_letter_topic", check_topic_name(f"{self.topic}{DEAD_LETTER_SUFFIX}")
            )
        if self.dead_letter_topic == self.topic:
            raise ValueError(f"dead_letter_topic must differ from topic ({self.topic!r})")
        return self


PartitionKey = tuple[str, int]


@dataclass(frozen=True)
class KafkaItem:
    """One consumed message: either a valid record or the reason it was rejected.

    Attributes:
        topic: Topic it was read from.
        partition: Its partition.
        offset: Its offset; commit ``offset + 1`` (:attr:`next_offset`) once it is checkpointed.
        key: The message key as text (the edit id), or ``None`` when the message had none.
        record: The validated record, or ``None`` when rejected.
        error: Why it was rejected (it is already in the dead-letter topic), or ``None``.
        timestamp_ms: The message timestamp in ms since the epoch, when the broker gave one.
    """

    topic: str
    partition: int
    offset: int
    key: str | None
    record: StreamRecord | None
    error: InvalidRecordError | None
    timestamp_ms: int | None = None

    def __post_init__(self) -> None:
        if (self.record is None) == (self.error is None):
            raise ValueError("KafkaItem needs exactly one of record / error")

    @property
    def next_offset(self) -> int:
        """The offset to commit once this message is checkpointed."""
        return self.offset + 1


def next_offsets(items: Iterable[KafkaItem]) -> dict[PartitionKey, int]:
    """Return, per ``(topic, partition)``, the offset after the last of ``items``: what to commit.

    Args:
        items: Items handed out by :meth:`~streams.kafka_consumer.KafkaEditConsumer.poll` (accepted and rejected).

    Returns:
        ``{(topic, partition): max(offset) + 1}``.
    """
    offsets: dict[PartitionKey, int] = {}
    for item in items:
        key = (item.topic, item.partition)
        offsets[key] = max(offsets.get(key, 0), item.next_offset)
    return offsets


def encode_record(record: StreamRecord) -> tuple[bytes, bytes]:
    """Return the ``(key, value)`` of the message carrying ``record``.

    Args:
        record: A validated record.

    Returns:
        The UTF-8 edit id and the record's canonical JSON.
    """
    return record.id.encode("utf-8"), record.to_json().encode("utf-8")


def decode_message(
    key: bytes | None, value: bytes | None, limits: RecordLimits
) -> tuple[str | None, StreamRecord | None, InvalidRecordError | None]:
    """Validate one message; never raises on bad input.

    Args:
        key: The message key (the edit id), or ``None``.
        value: The message value, or ``None`` for a tombstone.
        limits: Record limits in force.

    Returns:
        ``(key_text, record, error)``: the key as text (undecodable bytes replaced) or ``None``, and
        exactly one of the validated record and the rejection.
    """
    text = None if key is None else key.decode("utf-8", errors="replace")
    try:
        if key is not None and text is not None and text.encode("utf-8") != key:
            raise InvalidRecordError.from_issues([Issue(None, "message key is not valid UTF-8")])
        if value is None:
            raise InvalidRecordError.from_issues(
                [Issue(None, "message has no value (tombstone); expected a JSON edit record")]
            )
        record = parse_record(value, limits=limits)
        if text is not None and text != record.id:
            raise InvalidRecordError.from_issues(
                [Issue("id", f"{record.id!r} differs from the message key {text!r}")]
            )
    except InvalidRecordError as exc:
        return text, None, exc
    return text, record, None


def kafka_error(exc: BaseException) -> object:
    """Return the :class:`KafkaError` inside a :class:`KafkaException` (or ``exc`` itself), for messages."""
    return exc.args[0] if isinstance(exc, KafkaException) and exc.args else exc


def client_config(bootstrap: str, *layers: Mapping[str, Any], **fixed: Any) -> dict[str, Any]:
    """Build a librdkafka configuration: bootstrap, then ``layers`` in order, then ``fixed`` (which win).

    Args:
        bootstrap: ``bootstrap.servers``.
        layers: Settings dicts applied in order (defaults first, user settings last).
        fixed: Settings that must not be overridden (dots written as ``__``, e.g. ``group__id``).

    Returns:
        The configuration, with librdkafka's logs routed to :data:`RDKAFKA_LOGGER`.
    """
    config: dict[str, Any] = {"bootstrap.servers": bootstrap}
    for layer in layers:
        config.update(layer)
    config.update({key.replace("__", "."): value for key, value in fixed.items()})
    config["logger"] = RDKAFKA_LOGGER
    return config


def invalid_config_error(kind: str, exc: KafkaException) -> KafkaStreamError:
    """Wrap librdkafka's rejection of a configuration (unknown key, bad value).

    Args:
        kind: Which client (``"consumer"``, ``"producer"``, ``"admin client"``).
        exc: The exception librdkafka raised.

    Returns:
        The error to raise.
    """
    return KafkaStreamError(f"invalid Kafka {kind} settings: {kafka_error(exc)}")


def fetch_metadata(
    handle: Any, bootstrap: str, timeout_s: float, *, topic: str | None = None
) -> ClusterMetadata:
    """Ask the cluster for metadata, turning an unreachable broker into a clear error.

    Args:
        handle: A Consumer, Producer or AdminClient.
        bootstrap: The bootstrap address (for the message).
        timeout_s: Bounded retry window; librdkafka keeps reconnecting until it ends.
        topic: Only this topic's metadata, or every topic when ``None``.

    Returns:
        The cluster metadata.

    Raises:
        KafkaStreamError: No broker answered within ``timeout_s`` (or authentication failed).
    """
    try:
        return handle.list_topics(topic, timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaStreamError(
            f"Kafka broker at {bootstrap} unreachable: no metadata within {timeout_s:g}s ({kafka_error(exc)}); "
            "check that the broker runs and the address is right"
        ) from None


def create_topics(
    bootstrap: str,
    topics: Iterable[str],
    *,
    partitions: int = 1,
    replication_factor: int = -1,
    client: Mapping[str, Any] | None = None,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet; existing ones are left as they are.

    Args:
        bootstrap: Comma-separated ``host:port`` list of brokers.
        topics: Topic names.
        partitions: Partitions of each new topic (1 keeps a total order; see :mod:`streams.kafka_consumer`).
        replication_factor: Replicas of each new topic; -1 takes the broker's default.
        client: Extra librdkafka settings (security, ...).
        timeout_s: Bound on reaching the cluster and on the creation itself.

    Returns:
        The topics this call created, in the order given.

    Raises:
        ValueError: A topic name is invalid or ``partitions`` < 1.
        KafkaStreamError: The broker is unreachable or refused to create a topic.
    """
    names = [check_topic_name(name) for name in dict.fromkeys(topics)]
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions must be a positive int, got {partitions!r}")
    if not names:
        return []
    try:
        admin = AdminClient(client_config(bootstrap, dict(client or {})))
    except KafkaException as exc:
        raise invalid_config_error("admin client", exc) from None
    existing = set(fetch_metadata(admin, bootstrap, timeout_s).topics)
    missing = [name for name in names if name not in existing]
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(name, partitions, replication_factor) for name in missing], request_timeout=timeout_s
    )
    created = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            error = kafka_error(exc)
            # Another client may have created it between the metadata call and ours: that is success.
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise KafkaStreamError(f"cannot create topic {name!r} at {bootstrap}: {error}") from None
        except concurrent.futures.TimeoutError:
            raise KafkaStreamError(
                f"creating topic {name!r} at {bootstrap} did not finish within {timeout_s:g}s"
            ) from None
        created.append(name)
        logger.info("created Kafka topic %s (%d partition(s)) at %s", name, partitions, bootstrap)
    return [name for name in missing if name in created]
