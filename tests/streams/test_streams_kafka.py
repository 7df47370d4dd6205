"""Kafka edit streams against a real Kafka-protocol broker (tansu, see conftest.py).

Each test uses its own topics and consumer group on the shared broker. Group timeouts are short because
tansu holds the first JoinGroup for about half the session timeout.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from streams import (
    HEADER_REASON,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    DeadLetterFile,
    KafkaEditConsumer,
    KafkaItem,
    KafkaSettings,
    KafkaStreamError,
    RecordLimits,
    create_topics,
    next_offsets,
    open_source,
    produce_records,
    read_dead_letters,
)
from streams.kafka import decode_message

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
FAST_GROUP = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 200}
WAIT_S = 30.0


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _settings(bootstrap: str, topic: str, group: str, **overrides: Any) -> KafkaSettings:
    values: dict[str, Any] = {
        "bootstrap": bootstrap,
        "topic": topic,
        "group": group,
        "consumer_client": FAST_GROUP,
        "poll_timeout_s": 0.5,
        "connect_timeout_s": 10.0,
        "max_prefetch": 100,
    }
    values.update(overrides)
    return KafkaSettings(**values)


def _record(i: int) -> dict[str, Any]:
    return {"id": f"e{i}", "prompt": f"The capital of country {i} is", "target": f"City {i}"}


def _produce_raw(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> None:
    create_topics(bootstrap, [topic], timeout_s=10)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in messages:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(10) == 0


def _poll_until(consumer: KafkaEditConsumer, n: int, timeout_s: float = WAIT_S) -> list[KafkaItem]:
    items: list[KafkaItem] = []
    deadline = time.monotonic() + timeout_s
    while len(items) < n and time.monotonic() < deadline:
        items += consumer.poll(max_records=n - len(items), timeout_s=0.5)
    return items


def _read_topic(bootstrap: str, topic: str, n: int, partitions: int = 1) -> list[Any]:
    """Read a topic from the beginning without a group (assign), returning up to ``n`` messages."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": _name("reader"), "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    messages: list[Any] = []
    deadline = time.monotonic() + WAIT_S
    try:
        while len(messages) < n and time.monotonic() < deadline:
            messages += [m for m in consumer.consume(n - len(messages), 0.5) if m.error() is None]
        # Nothing beyond n may be there: give the broker a moment to show an extra message.
        messages += [m for m in consumer.consume(10, 0.5) if m.error() is None]
    finally:
        consumer.close()
    return messages


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- settings and message format (no broker) --------------------------------------------------------------


def test_settings_defaults_and_validation() -> None:
    settings = KafkaSettings(bootstrap="b:9092", topic="edits", group="job")
    assert settings.dead_letter_topic == "edits.dead-letter"
    assert (
        KafkaSettings(bootstrap="b", topic="t", group="g", dead_letter_topic="dlq").dead_letter_topic == "dlq"
    )
    with pytest.raises(ValueError, match=r"client\.enable\.auto\.commit is set by wisestream"):
        KafkaSettings(bootstrap="b", topic="t", group="g", client={"enable.auto.commit": True})
    with pytest.raises(ValueError, match="not a valid Kafka topic name"):
        KafkaSettings(bootstrap="b", topic="bad topic", group="g")
    with pytest.raises(ValueError, match="must differ from topic"):
        KafkaSettings(bootstrap="b", topic="t", group="g", dead_letter_topic="t")
    with pytest.raises(ValueError, match="connect_timeout_s"):
        KafkaSettings(bootstrap="b", topic="t", group="g", connect_timeout_s=0)
    with pytest.raises(ValueError, match="Extra inputs"):
        KafkaSettings(bootstrap="b", topic="t", group="g", topics="t")


def test_decode_message_rules() -> None:
    limits = RecordLimits()
    value = json.dumps(_record(1)).encode()
    assert decode_message(b"e1", value, limits)[1] is not None
    assert decode_message(None, value, limits)[1] is not None  # a missing key is accepted
    _, record, error = decode_message(b"e2", value, limits)
    assert record is None and error is not None and "differs from the message key" in error.reason
    key, record, error = decode_message(b"\xff\xfe", value, limits)
    assert record is None and error is not None and "not valid UTF-8" in error.reason and key is not None
    _, record, error = decode_message(b"e1", None, limits)
    assert record is None and error is not None and "tombstone" in error.reason


def test_next_offsets_takes_the_last_per_partition() -> None:
    from streams import parse_record

    record = parse_record(_record(0))
    items = [KafkaItem("t", p, o, None, record, None) for p, o in [(0, 3), (1, 7), (0, 5), (0, 4)]]
    assert next_offsets(items) == {("t", 0): 6, ("t", 1): 8}


# -- against the broker -----------------------------------------------------------------------------------


def test_valid_and_invalid_messages_and_dead_letter_topic(kafka_broker) -> None:
    topic, group = _name("edits"), _name("job")
    limits = RecordLimits(max_record_bytes=4096)
    oversized = dict(_record(99), ground_truth="x" * 5000)
    valid = [(f"e{i}".encode(), json.dumps(_record(i)).encode()) for i in range(6)]
    invalid = [
        (b"bad-json", b"{not json"),
        (b"e-missing", json.dumps({"id": "e-missing", "prompt": "Where is X?"}).encode()),
        (b"e-type", json.dumps({"id": "e-type", "prompt": "Where is X?", "target": 5}).encode()),
        (b"e99", json.dumps(oversized).encode()),
        (b"e-tomb", None),
    ]
    # Interleave: valid, invalid, valid, invalid, ... so order and offsets are checked across both.
    messages = [m for pair in zip(valid, [*invalid, None], strict=True) for m in pair if m is not None]
    _produce_raw(kafka_broker.bootstrap, topic, messages)

    with KafkaEditConsumer(_settings(kafka_broker.bootstrap, topic, group), limits=limits) as consumer:
        items = _poll_until(consumer, len(messages))
        assert [item.offset for item in items] == list(range(len(messages)))
        accepted = [item for item in items if item.record is not None]
        rejected = [item for item in items if item.error is not None]
        assert [item.record.id for item in accepted if item.record] == [f"e{i}" for i in range(6)]
        assert [item.key for item in accepted] == [f"e{i}" for i in range(6)]
        assert len(rejected) == len(invalid)
        assert consumer.counters() == {"accepted": 6, "rejected": 5}
        reasons = {item.key: item.error.reason for item in rejected if item.error}
        assert "not valid JSON" in reasons["bad-json"]
        assert "target: required field missing" in reasons["e-missing"]
        assert "target: must be a non-empty string, got int" in reasons["e-type"]
        assert "exceeds max_record_bytes=4096" in reasons["e99"]
        assert "tombstone" in reasons["e-tomb"]
        assert consumer.poll(timeout_s=0.3) == []

    dead = _read_topic(kafka_broker.bootstrap, f"{topic}.dead-letter", len(invalid))
    assert len(dead) == len(invalid)
    by_key = {m.key().decode(): m for m in dead}
    for item in rejected:
        message = by_key[item.key or ""]
        headers = {name: value.decode() for name, value in message.headers()}
        assert headers[HEADER_REASON] == reasons[item.key or ""]
        assert headers[HEADER_SOURCE_TOPIC] == topic
        assert headers[HEADER_SOURCE_PARTITION] == "0"
        assert headers[HEADER_SOURCE_OFFSET] == str(item.offset)
        assert message.value() == dict(messages)[message.key()]


def test_a_message_the_caller_refuses_is_dead_lettered_before_its_offset_is_committed(kafka_broker) -> None:
    topic, group = _name("edits"), _name("job")
    _produce_raw(kafka_broker.bootstrap, topic, [(b"e0", json.dumps(_record(0)).encode())])
    settings = _settings(kafka_broker.bootstrap, topic, group)
    with KafkaEditConsumer(settings) as consumer:
        (item,) = _poll_until(consumer, 1)
        assert item.record is not None  # valid for the stream, refused by the job (e.g. too many tokens)
        consumer.dead_letter(item, "prompt + answer is 300 tokens, over max_prompt_tokens=256", b"{...}")
        consumer.commit(next_offsets([item]))
        assert consumer.committed()[(topic, 0)] == 1
    (dead,) = _read_topic(kafka_broker.bootstrap, settings.dead_letter_topic, 1)
    headers = {k: v.decode() for k, v in dead.headers()}
    assert dead.key() == b"e0" and dead.value() == b"{...}"
    assert "max_prompt_tokens" in headers["reason"] and headers["source.offset"] == "0"


def test_commit_resume_redelivery_and_lag(kafka_broker) -> None:
    topic, group = _name("edits"), _name("job")
    _produce_raw(
        kafka_broker.bootstrap, topic, [(f"e{i}".encode(), json.dumps(_record(i)).encode()) for i in range(6)]
    )
    settings = _settings(kafka_broker.bootstrap, topic, group)

    with KafkaEditConsumer(settings) as first:
        items = _poll_until(first, 6)
        assert [item.offset for item in items] == list(range(6))
        assert first.committed() == {(topic, 0): None}
        assert first.lag() == {(topic, 0): 6}  # nothing committed: counts from the low watermark
        first.commit(next_offsets(items[:4]))  # only the first 4 are "checkpointed"
        assert first.committed() == {(topic, 0): 4}
        assert first.lag() == {(topic, 0): 6 - 4}  # end offset minus committed
        assert first.lag(basis="position") == {(topic, 0): 0}

    # Same group, committed: resumes right after the commit; nothing before it comes again.
    with KafkaEditConsumer(settings) as second:
        resumed = _poll_until(second, 2)
        assert [item.offset for item in resumed] == [4, 5]
        assert [item.record.id for item in resumed if item.record] == ["e4", "e5"]
        assert second.poll(timeout_s=0.5) == []
        # ... and closes WITHOUT committing

    with KafkaEditConsumer(settings) as third:
        redelivered = _poll_until(third, 2)
        assert [item.offset for item in redelivered] == [4, 5]
        third.commit(next_offsets(redelivered))
        assert third.lag() == {(topic, 0): 0}


def test_pause_stops_delivery_and_resume_keeps_order(kafka_broker) -> None:
    topic = _name("edits")
    _produce_raw(
        kafka_broker.bootstrap, topic, [(f"e{i}".encode(), json.dumps(_record(i)).encode()) for i in range(5)]
    )
    with KafkaEditConsumer(_settings(kafka_broker.bootstrap, topic, _name("job"))) as consumer:
        first = _poll_until(consumer, 1)
        assert [item.offset for item in first] == [0]
        consumer.pause_all()
        assert consumer.paused
        assert consumer.poll(timeout_s=0.5) == []
        assert consumer.poll(timeout_s=0.5) == []
        consumer.resume_all()
        rest = _poll_until(consumer, 4)
        assert [item.offset for item in rest] == [1, 2, 3, 4]


def test_produce_records_from_counterfact_round_trips(kafka_broker) -> None:
    path = DATA_DIR / "counterfact_100.json"
    topic = _name("counterfact")
    produced, invalid = produce_records(path, "counterfact", topic, kafka_broker.bootstrap)
    expected = [item.record for item in open_source(path, "counterfact") if item.record is not None]
    assert (produced, invalid) == (len(expected), 0) == (100, 0)

    with KafkaEditConsumer(_settings(kafka_broker.bootstrap, topic, _name("job"))) as consumer:
        items = _poll_until(consumer, produced)
        assert consumer.poll(timeout_s=0.3) == []
    assert [item.record for item in items] == expected
    assert [item.key for item in items] == [record.id for record in expected if record]


def test_produce_records_reports_invalid_rows(kafka_broker, tmp_path: Path) -> None:
    path = tmp_path / "edits.jsonl"
    lines = [json.dumps(_record(0)), "{oops", json.dumps({"id": "x", "prompt": "p"}), json.dumps(_record(1))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    topic = _name("jsonl")
    with DeadLetterFile(tmp_path / "rejected.jsonl") as dead:
        produced, invalid = produce_records(path, "jsonl", topic, kafka_broker.bootstrap, dead_letter=dead)
    assert (produced, invalid) == (2, 2)
    assert [letter.position for letter in read_dead_letters(tmp_path / "rejected.jsonl")] == [1, 2]
    messages = _read_topic(kafka_broker.bootstrap, topic, 2)
    assert [m.key() for m in messages] == [b"e0", b"e1"]
    assert json.loads(messages[0].value()) == {
        **_record(0),
        "subject": None,
        "rephrase": [],
        "locality_prompt": None,
        "locality_answer": None,
        "portability": [],
        "ground_truth": None,
    }


def test_partitions_keep_their_own_order(kafka_broker) -> None:
    topic = _name("multi")
    create_topics(kafka_broker.bootstrap, [topic], partitions=3, timeout_s=10)
    records = [_record(i) for i in range(30)]
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap, "enable.idempotence": True})
    for record in records:
        producer.produce(topic, key=record["id"].encode(), value=json.dumps(record).encode())
    assert producer.flush(10) == 0

    with KafkaEditConsumer(_settings(kafka_broker.bootstrap, topic, _name("job"))) as consumer:
        items = _poll_until(consumer, len(records))
        assert sorted(consumer.assignment()) == [(topic, 0), (topic, 1), (topic, 2)]
    assert sorted(item.record.id for item in items if item.record) == sorted(r["id"] for r in records)
    produced_order = [r["id"] for r in records]
    for partition in range(3):
        mine = [item for item in items if item.partition == partition]
        assert [item.offset for item in mine] == list(range(len(mine)))
        ids = [item.record.id for item in mine if item.record]
        assert ids == sorted(ids, key=produced_order.index)  # same relative order as produced


def test_unreachable_bootstrap_raises_within_the_window(tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{_closed_port()}"
    settings = KafkaSettings(bootstrap=bootstrap, topic="edits", group="job", connect_timeout_s=1.5)
    started = time.monotonic()
    with pytest.raises(KafkaStreamError, match=f"Kafka broker at {bootstrap} unreachable"):
        KafkaEditConsumer(settings)
    assert time.monotonic() - started < 6.0
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(_record(0)) + "\n", encoding="utf-8")
    started = time.monotonic()
    with pytest.raises(KafkaStreamError, match=bootstrap):
        produce_records(path, "jsonl", "edits", bootstrap, connect_timeout_s=1.5)
    assert time.monotonic() - started < 6.0


def test_broker_lost_mid_stream_raises_after_the_window(tansu_factory: Callable[[], Any]) -> None:
    broker = tansu_factory()
    topic = _name("edits")
    _produce_raw(broker.bootstrap, topic, [(b"e0", json.dumps(_record(0)).encode())])
    consumer = KafkaEditConsumer(_settings(broker.bootstrap, topic, _name("job"), connect_timeout_s=2.0))
    try:
        assert len(_poll_until(consumer, 1)) == 1
        broker.stop()
        started = time.monotonic()
        with pytest.raises(KafkaStreamError, match=f"Kafka broker at {broker.bootstrap} unreachable for"):
            while time.monotonic() - started < 20:
                consumer.poll(timeout_s=0.2)
        assert time.monotonic() - started < 10.0
    finally:
        consumer.close()
