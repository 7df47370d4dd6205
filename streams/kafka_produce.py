"""Producing to Kafka: pushing an edit file into a topic, and writing rejected messages to a dead-letter topic.

``wisestream produce --data FILE [--format F] --topic T --bootstrap B`` is :func:`produce_records`: any format
:func:`~streams.sources.open_source` reads is validated row by row; valid records are sent in file order
as canonical JSON keyed by their id, invalid rows are reported (logged, optionally written to a
:class:`~streams.deadletter.DeadLetterFile`) and not sent. The producer is idempotent, so retries neither
duplicate nor reorder messages within a partition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from tqdm import tqdm

from streams.deadletter import DeadLetterFile
from streams.kafka import (
    HEADER_REASON,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    KafkaStreamError,
    check_topic_name,
    client_config,
    create_topics,
    encode_record,
    fetch_metadata,
    invalid_config_error,
)
from streams.record import RecordLimits
from streams.sources import open_source

logger = logging.getLogger(__name__)

_DEFAULT_LIMITS = RecordLimits()
# Idempotence keeps per-partition order across retries; acks=all waits for every in-sync replica.
_PRODUCER_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"acks": "all", "enable.idempotence": True, "linger.ms": 5}
)


class _DeliveryTracker:
    """Counts delivery reports (called by librdkafka inside ``poll``/``flush``)."""

    def __init__(self) -> None:
        self.delivered = 0
        self.errors: list[str] = []

    def __call__(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self.delivered += 1
        else:
            self.errors.append(f"{message.topic()}: {error}")


def new_producer(bootstrap: str, client: Mapping[str, Any] | None = None, **fixed: Any) -> Producer:
    """Create an idempotent producer (``acks=all``) with the given extra settings.

    Args:
        bootstrap: Comma-separated ``host:port`` list of brokers.
        client: Extra librdkafka settings (security, ...); they override the defaults.
        fixed: Settings that override everything (dots written as ``__``), e.g. ``error_cb``.

    Returns:
        The producer.

    Raises:
        KafkaStreamError: librdkafka rejected a setting.
    """
    try:
        return Producer(client_config(bootstrap, _PRODUCER_DEFAULTS, dict(client or {}), **fixed))
    except KafkaException as exc:
        raise invalid_config_error("producer", exc) from None


def produce_bounded(producer: Producer, timeout_s: float, topic: str, **message: Any) -> None:
    """Enqueue one message, waiting (serving delivery reports) while the local queue is full.

    Args:
        producer: The producer.
        timeout_s: Longest wait for room in the queue.
        topic: Destination topic.
        message: ``value``, ``key``, ``headers``, ``on_delivery``, ... as for ``Producer.produce``.

    Raises:
        KafkaStreamError: The queue stayed full for ``timeout_s`` (the broker is not taking messages).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            producer.produce(topic, **message)
            return
        except BufferError:
            if time.monotonic() > deadline:
                raise KafkaStreamError(
                    f"producer queue for {topic} stayed full for {timeout_s:g}s; is the broker reachable?"
                ) from None
            producer.poll(0.1)


def flush_checked(producer: Producer, tracker: _DeliveryTracker, timeout_s: float, what: str) -> None:
    """Wait for every queued message and raise if any was not delivered.

    Args:
        producer: The producer.
        tracker: The delivery callback the messages were produced with.
        timeout_s: Longest wait.
        what: What the messages are, for the error message.

    Raises:
        KafkaStreamError: Messages still queued after ``timeout_s``, or delivery failures.
    """
    remaining = producer.flush(timeout_s)
    if remaining:
        raise KafkaStreamError(f"{remaining} {what} not delivered within {timeout_s:g}s")
    if tracker.errors:
        raise KafkaStreamError(f"{len(tracker.errors)} {what} failed: {tracker.errors[0]}")


class DeadLetterProducer:
    """Writes rejected messages, unchanged, to a dead-letter topic with the reason in headers.

    Args:
        bootstrap: Comma-separated ``host:port`` list of brokers.
        topic: The dead-letter topic.
        client: Extra librdkafka settings (security, ...).
        timeout_s: Bound on each :meth:`flush` (and on waiting for room in the queue).
        error_cb: Receives client-level errors (e.g. broker unreachable).

    Raises:
        KafkaStreamError: librdkafka rejected a setting.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        client: Mapping[str, Any] | None = None,
        timeout_s: float = 30.0,
        error_cb: Any = None,
    ) -> None:
        self.topic = check_topic_name(topic)
        self.bootstrap = bootstrap
        self.timeout_s = timeout_s
        extra = {} if error_cb is None else {"error_cb": error_cb}
        self._producer = new_producer(bootstrap, client, **extra)
        self._tracker = _DeliveryTracker()
        self.written = 0

    def send(
        self, *, key: bytes | None, value: bytes | None, reason: str, topic: str, partition: int, offset: int
    ) -> None:
        """Queue one rejected message; call :meth:`flush` before committing its offset.

        Args:
            key: The original key.
            value: The original value (``None`` for a tombstone).
            reason: Why it was rejected.
            topic: Topic it came from.
            partition: Partition it came from.
            offset: Its offset there.

        Raises:
            KafkaStreamError: The local queue stayed full for ``timeout_s``.
        """
        headers = [
            (HEADER_REASON, reason.encode("utf-8")),
            (HEADER_SOURCE_TOPIC, topic.encode("utf-8")),
            (HEADER_SOURCE_PARTITION, str(partition).encode("ascii")),
            (HEADER_SOURCE_OFFSET, str(offset).encode("ascii")),
        ]
        produce_bounded(
            self._producer,
            self.timeout_s,
            self.topic,
            key=key,
            value=value,
            headers=headers,
            on_delivery=self._tracker,
        )

    def flush(self) -> None:
        """Wait until every queued dead letter is acknowledged.

        Raises:
            KafkaStreamError: Some were not delivered within ``timeout_s`` or were refused.
        """
        tracker, self._tracker = self._tracker, _DeliveryTracker()
        try:
            flush_checked(
                self._producer, tracker, self.timeout_s, f"dead letter(s) to {self.topic} at {self.bootstrap}"
            )
        finally:
            self.written += tracker.delivered

    def close(self) -> None:
        """Deliver what is still queued (bounded by ``timeout_s``), logging anything left."""
        remaining = self._producer.flush(self.timeout_s)
        if remaining:
            logger.warning("%d dead letter(s) to %s undelivered at close", remaining, self.topic)


def produce_records(
    path: str | Path,
    format: str,
    topic: str,
    bootstrap: str,
    client: Mapping[str, Any] | None = None,
    *,
    limits: RecordLimits = _DEFAULT_LIMITS,
    partitions: int = 1,
    dead_letter: DeadLetterFile | None = None,
    connect_timeout_s: float = 30.0,
    flush_timeout_s: float = 120.0,
    progress: bool = False,
) -> tuple[int, int]:
    """Push an edit file into a topic: valid records as canonical JSON keyed by id, in file order.

    The topic is created with ``partitions`` partitions when missing (one keeps a total order; with more,
    records are spread by the hash of their id, and only per-partition order is kept).

    Args:
        path: The edit file (or saved dataset directory).
        format: A key of :data:`~streams.sources.FORMATS` (``auto``, ``zsre``, ``counterfact``, ...).
        topic: Destination topic.
        bootstrap: Comma-separated ``host:port`` list of brokers.
        client: Extra librdkafka settings (security, ...).
        limits: Record limits; rows over them are invalid.
        partitions: Partitions of the topic if this call creates it.
        dead_letter: Where invalid rows are written (they are always logged and counted).
        connect_timeout_s: Bounded retry window for reaching the broker and creating the topic.
        flush_timeout_s: Longest wait for the broker to acknowledge everything at the end.
        progress: Show a progress bar.

    Returns:
        ``(n_produced, n_invalid)``: records acknowledged by the broker and rows not sent.

    Raises:
        FormatError: Unknown format, or the file cannot be parsed in it.
        SourceError: The file cannot be read (or ``dead_letter`` cannot be written).
        ValueError: Invalid topic name or ``partitions``.
        KafkaStreamError: Broker unreachable within ``connect_timeout_s``, topic creation refused, or
            records not acknowledged within ``flush_timeout_s``.
    """
    check_topic_name(topic)
    source = open_source(path, format, limits=limits)
    producer = new_producer(bootstrap, client)
    metadata = fetch_metadata(producer, bootstrap, connect_timeout_s)
    if topic not in metadata.topics:
        create_topics(bootstrap, [topic], partitions=partitions, client=client, timeout_s=connect_timeout_s)
    tracker = _DeliveryTracker()
    n_invalid = 0
    items = tqdm(source, total=source.num_items, unit="edit", desc=f"produce {topic}", disable=not progress)
    for item in items:
        if item.record is None:
            reason = item.error.reason if item.error is not None else "rejected"
            logger.warning("not producing %s row %d: %s", source.name, item.position, reason)
            n_invalid += 1
            if dead_letter is not None:
                dead_letter.write(position=item.position, source=source.name, reason=reason, raw=item.raw)
            continue
        key, value = encode_record(item.record)
        produce_bounded(producer, connect_timeout_s, topic, key=key, value=value, on_delivery=tracker)
        producer.poll(0)
    flush_checked(producer, tracker, flush_timeout_s, f"record(s) to {topic} at {bootstrap}")
    logger.info(
        "produced %d record(s) from %s to %s at %s (%d invalid not sent)",
        tracker.delivered,
        source.name,
        topic,
        bootstrap,
        n_invalid,
    )
    return tracker.delivered, n_invalid
