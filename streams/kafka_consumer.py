"""Consuming edit records from Kafka: a group consumer with manual commits and a dead-letter topic.

Messages follow the format of :mod:`streams.kafka` (canonical JSON value, edit id as key). A message that
fails validation is produced to the dead-letter topic before ``poll`` returns and handed out as a rejected
item, so its offset is committed with the batch. Input never raises; only infrastructure failures do
(:class:`~streams.kafka.KafkaStreamError`).

Delivery is at-least-once. Auto-commit is off: the job calls :meth:`KafkaEditConsumer.commit` with the
next offsets of the edits that are in a checkpoint, so a crash re-delivers what came after it (rejections
included: the dead-letter topic may then hold a message twice, de-duplicate on the ``source.*`` headers).

Ordering. Kafka orders messages within a partition only. ``poll`` returns each partition's messages in
offset order and the job applies them in the order ``poll`` returns them, so:

* one partition (what :func:`~streams.kafka_produce.produce_records` creates by default): the edit order is
  the produce order, and a rerun from the same offsets applies the same edits in the same order;
* several partitions: the order within each partition is kept, but partitions are interleaved in arrival
  order of the fetches, which can differ between runs. Use it only when edits to the same fact share a
  key (they then land in the same partition) and the cross-partition order does not matter. With several
  consumers in a group, each gets a subset of partitions; a rebalance re-delivers uncommitted messages to
  the new owner.

Backpressure: librdkafka buffers at most about ``max_prefetch`` messages per partition ahead of ``poll``,
and :meth:`KafkaEditConsumer.pause_all` stops fetching altogether while the editors are busy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Literal

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from streams.kafka import (
    KafkaItem,
    KafkaSettings,
    KafkaStreamError,
    PartitionKey,
    client_config,
    create_topics,
    decode_message,
    fetch_metadata,
    invalid_config_error,
    kafka_error,
)
from streams.kafka_produce import DeadLetterProducer
from streams.record import RecordLimits

logger = logging.getLogger(__name__)

_DEFAULT_LIMITS = RecordLimits()

# Errors that mean "no broker is reachable right now"; librdkafka keeps retrying, we bound how long.
_CONNECTIVITY_CODES = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE})


class KafkaEditConsumer:
    """Read edit records from a Kafka topic as a member of a consumer group.

    Use it from one thread (librdkafka serves its callbacks inside ``poll``); ``close`` it, or use it as a
    context manager, to leave the group promptly.

    Args:
        settings: Broker, topic, group and client settings.
        limits: Record limits, the same ones file sources enforce.

    Attributes:
        settings: The settings.
        limits: The record limits.
        accepted: Valid records handed out so far.
        rejected: Messages rejected (and dead-lettered) so far.

    Raises:
        KafkaStreamError: Invalid client settings, or no broker reachable within
            ``settings.connect_timeout_s``.
    """

    def __init__(self, settings: KafkaSettings, limits: RecordLimits = _DEFAULT_LIMITS) -> None:
        self.settings = settings
        self.limits = limits
        self.accepted = 0
        self.rejected = 0
        self._paused = False
        self._closed = False
        self._down_since: float | None = None
        self._last_error: KafkaError | None = None
        self._fatal: KafkaError | None = None
        try:
            self._consumer = Consumer(
                client_config(
                    settings.bootstrap,
                    {"auto.offset.reset": "earliest"},
                    settings.client,
                    settings.consumer_client,
                    group__id=settings.group,
                    enable__auto__commit=False,
                    queued__min__messages=settings.max_prefetch,
                    error_cb=self._on_error,
                )
            )
        except KafkaException as exc:
            raise invalid_config_error("consumer", exc) from None
        try:
            self._dead_letters = DeadLetterProducer(
                settings.bootstrap,
                settings.dead_letter_topic,
                client=settings.client,
                timeout_s=settings.connect_timeout_s,
                error_cb=self._on_error,
            )
        except KafkaStreamError:
            self._consumer.close()
            raise
        try:
            self._prepare_topics()
            self._consumer.subscribe(
                [settings.topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )
        except BaseException:
            self.close()
            raise
        logger.info(
            "consuming %s at %s as group %s (dead letters to %s)",
            settings.topic,
            settings.bootstrap,
            settings.group,
            settings.dead_letter_topic,
        )

    def _prepare_topics(self) -> None:
        settings = self.settings
        metadata = fetch_metadata(self._consumer, settings.bootstrap, settings.connect_timeout_s)
        if settings.topic not in metadata.topics:
            logger.warning(
                "topic %s does not exist yet at %s; waiting for it", settings.topic, settings.bootstrap
            )
        if settings.dead_letter_topic not in metadata.topics:
            try:
                create_topics(
                    settings.bootstrap,
                    [settings.dead_letter_topic],
                    client=settings.client,
                    timeout_s=settings.connect_timeout_s,
                )
            except KafkaStreamError as exc:
                # Clusters with ACLs may forbid creation but auto-create on produce; a real failure shows
                # up as a delivery error on the first rejection.
                logger.warning("could not create dead-letter topic: %s", exc)

    # -- librdkafka callbacks (run inside poll/consume/flush) ------------------------------------------

    def _on_error(self, error: KafkaError) -> None:
        self._last_error = error
        if error.fatal():
            self._fatal = error
            logger.error("fatal Kafka error at %s: %s", self.settings.bootstrap, error)
        elif error.code() in _CONNECTIVITY_CODES:
            if self._down_since is None:
                self._down_since = time.monotonic()
                logger.warning("Kafka broker at %s unreachable, retrying: %s", self.settings.bootstrap, error)
            else:
                logger.debug("Kafka broker still unreachable: %s", error)
        else:
            logger.warning("Kafka error at %s: %s", self.settings.bootstrap, error)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("assigned %s", [f"{tp.topic}[{tp.partition}]" for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info(
            "revoked %s (uncommitted messages go to the next owner)",
            [f"{tp.topic}[{tp.partition}]" for tp in partitions],
        )

    # -- reading -----------------------------------------------------------------------------------------

    def poll(self, max_records: int | None = None, timeout_s: float | None = None) -> list[KafkaItem]:
        """Return the next messages, valid and rejected, in the order the job must apply them.

        Returns as soon as at least one message is available (up to ``max_records``), or after
        ``timeout_s`` with an empty list. Rejected messages are in the dead-letter topic when this returns.
        While paused (:meth:`pause_all`) it returns nothing, except messages of a partition that a rebalance
        assigns during this very call (they are handed out and must be kept like any other), but must still
        be called regularly (at least every ``max.poll.interval.ms``, 5 min by default) to stay in the group.

        Args:
            max_records: Most items to return (default ``settings.max_prefetch``).
            timeout_s: Longest wait for the first message (default ``settings.poll_timeout_s``).

        Returns:
            Items in per-partition offset order.

        Raises:
            ValueError: ``max_records`` is not a positive int or ``timeout_s`` is negative.
            KafkaStreamError: The consumer is closed, a fatal client error occurred, the broker has been
                unreachable for longer than ``connect_timeout_s``, or dead letters could not be delivered.
        """
        max_records = self.settings.max_prefetch if max_records is None else max_records
        timeout_s = self.settings.poll_timeout_s if timeout_s is None else timeout_s
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records <= 0:
            raise ValueError(f"max_records must be a positive int, got {max_records!r}")
        if timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout_s!r}")
        self._check_open()
        if self._paused:
            # Partitions assigned by a rebalance during the pause start unpaused: pause them too.
            self._consumer.pause(self._consumer.assignment())
        messages = self._consume(max_records, timeout_s)
        if self._fatal is not None:
            raise KafkaStreamError(f"fatal Kafka error at {self.settings.bootstrap}: {self._fatal}")
        items: list[KafkaItem] = []
        for message in messages:
            error = message.error()
            if error is None:
                items.append(self._item(message))
            elif error.fatal():
                raise KafkaStreamError(f"fatal Kafka error at {self.settings.bootstrap}: {error}")
            else:
                self._on_error(error)
        if items:
            self._down_since = None
        else:
            self._check_broker()
        if any(item.error is not None for item in items):
            # Before returning: the caller may commit these offsets as soon as it has the items.
            self._dead_letters.flush()
        return items

    def _consume(self, max_records: int, timeout_s: float) -> list[Message]:
        try:
            # consume(n, t) waits until n messages or t: take what is buffered first, and otherwise wait
            # only for the first message, so a sparse stream does not add a full timeout per poll.
            messages = self._consumer.consume(max_records, 0)
            if not messages:
                first = self._consumer.poll(timeout_s)
                if first is not None:
                    messages = [first]
                    if max_records > 1:
                        messages += self._consumer.consume(max_records - 1, 0)
        except (KafkaException, RuntimeError) as exc:
            raise KafkaStreamError(f"consuming {self.settings.topic} failed: {kafka_error(exc)}") from None
        return messages

    def _item(self, message: Message) -> KafkaItem:
        key, record, error = decode_message(message.key(), message.value(), self.limits)
        kind, stamp = message.timestamp()
        item = KafkaItem(
            topic=message.topic(),
            partition=message.partition(),
            offset=message.offset(),
            key=key,
            record=record,
            error=error,
            timestamp_ms=None if kind == TIMESTAMP_NOT_AVAILABLE else stamp,
        )
        if error is None:
            self.accepted += 1
            return item
        self.rejected += 1
        logger.warning(
            "rejected edit at %s[%d]@%d (key=%r): %s",
            item.topic,
            item.partition,
            item.offset,
            key,
            error.reason,
        )
        self._dead_letters.send(
            key=message.key(),
            value=message.value(),
            reason=error.reason,
            topic=item.topic,
            partition=item.partition,
            offset=item.offset,
        )
        return item

    def _check_broker(self) -> None:
        """Raise once the broker has been unreachable for longer than the retry window."""
        if self._down_since is None:
            return
        probe_s = min(1.0, self.settings.connect_timeout_s)
        try:
            self._consumer.list_topics(self.settings.topic, timeout=probe_s)
        except KafkaException as exc:
            down_for = time.monotonic() - self._down_since
            if down_for >= self.settings.connect_timeout_s:
                raise KafkaStreamError(
                    f"Kafka broker at {self.settings.bootstrap} unreachable for {down_for:.1f}s "
                    f"(connect_timeout_s={self.settings.connect_timeout_s:g}): {self._last_error or kafka_error(exc)}"
                ) from None
            return
        logger.info("Kafka broker at %s reachable again", self.settings.bootstrap)
        self._down_since = None

    # -- offsets -----------------------------------------------------------------------------------------

    def dead_letter(self, item: KafkaItem, reason: str, value: bytes | None) -> None:
        """Send a message the caller refused after validation (e.g. too long for the model) to the dead-letter
        topic, with the same headers as the consumer's own rejections; it is delivered before the next commit.

        Args:
            item: The refused message.
            reason: Why it was refused.
            value: What to store as the dead letter's value (the record as JSON).
        """
        self._check_open()
        self._dead_letters.send(
            key=None if item.key is None else item.key.encode(),
            value=value,
            reason=reason,
            topic=item.topic,
            partition=item.partition,
            offset=item.offset,
        )

    def commit(self, offsets: Mapping[PartitionKey, int]) -> None:
        """Commit, synchronously, that everything before these offsets is checkpointed.

        Args:
            offsets: ``{(topic, partition): next_offset}`` (see :func:`~streams.kafka.next_offsets`); empty is a no-op.

        Raises:
            ValueError: An offset is not a non-negative int.
            KafkaStreamError: The consumer is closed or the group coordinator refused or did not answer.
        """
        self._check_open()
        for (topic, partition), offset in offsets.items():
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ValueError(
                    f"offset for {topic}[{partition}] must be a non-negative int, got {offset!r}"
                )
        if not offsets:
            return
        self._dead_letters.flush()  # an offset is committed only once its dead letters are in the topic
        partitions = [
            TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()
        ]
        try:
            result = self._consumer.commit(offsets=partitions, asynchronous=False) or []
        except KafkaException as exc:
            raise KafkaStreamError(
                f"commit of {dict(offsets)} for group {self.settings.group} at {self.settings.bootstrap} "
                f"failed: {kafka_error(exc)}"
            ) from None
        failed = [f"{tp.topic}[{tp.partition}]: {tp.error}" for tp in result if tp.error is not None]
        if failed:
            raise KafkaStreamError(f"commit for group {self.settings.group} failed for {failed}")
        logger.debug("committed %s", dict(offsets))

    def committed(self, timeout_s: float | None = None) -> dict[PartitionKey, int | None]:
        """Return the group's committed next-offsets for the assigned partitions (or all of the topic's).

        Args:
            timeout_s: Bound on the request (default ``settings.connect_timeout_s``).

        Returns:
            ``{(topic, partition): offset}``, ``None`` where the group has committed nothing.

        Raises:
            KafkaStreamError: The consumer is closed or the coordinator did not answer in time.
        """
        self._check_open()
        timeout_s = self.settings.connect_timeout_s if timeout_s is None else timeout_s
        try:
            result = self._consumer.committed(self._partitions(), timeout=timeout_s)
        except KafkaException as exc:
            raise KafkaStreamError(
                f"cannot read committed offsets of group {self.settings.group} at {self.settings.bootstrap}: "
                f"{kafka_error(exc)}"
            ) from None
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in result}

    def lag(self, basis: Literal["committed", "position"] = "committed") -> dict[PartitionKey, int]:
        """Measure consumer lag per partition: high watermark minus the committed offset (or position).

        ``committed`` is the group lag monitoring tools report (what a restart would re-read);
        ``position`` is what this consumer has not handed out yet. A partition with no committed offset
        (or position) counts from its low watermark, since the consumer starts at the earliest message.

        Args:
            basis: ``"committed"`` or ``"position"``.

        Returns:
            ``{(topic, partition): lag}`` over the assigned partitions, or all of the topic's before
            the first assignment.

        Raises:
            ValueError: Unknown ``basis``.
            KafkaStreamError: The consumer is closed or the broker did not answer in time.
        """
        if basis not in ("committed", "position"):
            raise ValueError(f"basis must be 'committed' or 'position', got {basis!r}")
        self._check_open()
        partitions = self._partitions()
        if basis == "committed":
            starts = self.committed()
        else:
            starts = {
                (tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None)
                for tp in self._consumer.position(partitions)
            }
            if any(start is None for start in starts.values()):
                committed = self.committed()
                starts = {
                    key: committed.get(key) if start is None else start for key, start in starts.items()
                }
        lags: dict[PartitionKey, int] = {}
        for tp in partitions:
            low, high = self._watermarks(tp)
            start = starts.get((tp.topic, tp.partition))
            lags[(tp.topic, tp.partition)] = max(0, high - (low if start is None else start))
        return lags

    def _watermarks(self, tp: TopicPartition) -> tuple[int, int]:
        try:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=self.settings.connect_timeout_s)
        except KafkaException as exc:
            raise KafkaStreamError(
                f"cannot read offsets of {tp.topic}[{tp.partition}] at {self.settings.bootstrap}: {kafka_error(exc)}"
            ) from None
        # The high watermark only grows, so the larger of the broker's answer and the one cached from the
        # last fetch is the freshest; some brokers (tansu) answer ListOffsets per batch, not per message.
        _, cached_high = self._consumer.get_watermark_offsets(tp, cached=True)
        return low, max(high, cached_high)

    def _partitions(self) -> list[TopicPartition]:
        assigned = self._consumer.assignment()
        if assigned:
            return [TopicPartition(tp.topic, tp.partition) for tp in assigned]
        metadata = fetch_metadata(
            self._consumer,
            self.settings.bootstrap,
            self.settings.connect_timeout_s,
            topic=self.settings.topic,
        )
        topic = metadata.topics.get(self.settings.topic)
        if topic is None or topic.error is not None:
            return []
        return [TopicPartition(self.settings.topic, partition) for partition in sorted(topic.partitions)]

    def assignment(self) -> list[PartitionKey]:
        """Return the ``(topic, partition)`` pairs currently assigned to this consumer."""
        self._check_open()
        return [(tp.topic, tp.partition) for tp in self._consumer.assignment()]

    # -- flow control and lifecycle ----------------------------------------------------------------------

    def pause_all(self) -> None:
        """Stop fetching from every assigned partition (backpressure); buffered messages are re-fetched later.

        Raises:
            KafkaStreamError: The consumer is closed.
        """
        self._check_open()
        self._paused = True
        self._consumer.pause(self._consumer.assignment())

    def resume_all(self) -> None:
        """Resume fetching from every assigned partition, at the next offset ``poll`` would have returned.

        Raises:
            KafkaStreamError: The consumer is closed.
        """
        self._check_open()
        self._paused = False
        self._consumer.resume(self._consumer.assignment())

    @property
    def paused(self) -> bool:
        """True between :meth:`pause_all` and :meth:`resume_all`."""
        return self._paused

    def counters(self) -> dict[str, int]:
        """Return ``accepted`` and ``rejected`` (for logs and metrics)."""
        return {"accepted": self.accepted, "rejected": self.rejected}

    def _check_open(self) -> None:
        if self._closed:
            raise KafkaStreamError(f"consumer of {self.settings.topic} is closed")

    def close(self) -> None:
        """Leave the group (nothing is committed) and release the clients; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._dead_letters.close()
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            logger.warning("closing the Kafka consumer failed: %s", kafka_error(exc))

    def __enter__(self) -> KafkaEditConsumer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"KafkaEditConsumer(topic={self.settings.topic!r}, group={self.settings.group!r}, "
            f"bootstrap={self.settings.bootstrap!r}, {self.counters()})"
        )
