"""The job reading a Kafka topic, on a real local Ray and a real Kafka-protocol broker (tansu, see
tests/conftest.py): dead-letter topic and committed offsets, kill -9 and resume with every edit applied once,
long-running mode stopped by SIGTERM and resumed from the committed offsets.

Group timeouts are short because tansu holds the first JoinGroup for about half the session timeout.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from helpers import n_iter

from orchestrator.config import load_config
from orchestrator.job import run_job
from streams import HEADER_REASON
from wise.state import read_state
from wisestream.cli import main

FAST_GROUP = "{session.timeout.ms: 2000, heartbeat.interval.ms: 200}"
INVALID = [b"not json", b'{"id": "bad", "prompt": ""}']


def _edits(job_files: Path, first: int, n: int) -> list[dict]:
    """Edits ``u{first}`` .. of the 24-edit stream of ``job_files``."""
    path = Path(load_config(job_files).stream.path)
    return [json.loads(line) for line in path.read_text().splitlines()][first : first + n]


def _kafka(bootstrap: str, topic: str, group: str) -> list[str]:
    return [
        "stream.kind=kafka",
        "stream.path=null",
        f"stream.bootstrap={bootstrap}",
        f"stream.topic={topic}",
        f"stream.group={group}",
        f"stream.consumer_client={FAST_GROUP}",
        "stream.connect_timeout_s=10",
        "stream.poll_timeout_s=0.3",
    ]


def _produce(tmp_path: Path, bootstrap: str, topic: str, edits: list[dict], capsys) -> None:
    data = tmp_path / f"produce-{uuid.uuid4().hex[:6]}.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in edits))
    args = ["produce", "--data", str(data), "--format", "jsonl", "--topic", topic, "--bootstrap", bootstrap]
    assert main(args) == 0
    assert f"produced {len(edits)}, invalid 0" in capsys.readouterr().out


def _produce_raw(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for v in values:
        producer.produce(topic, value=v)
    assert producer.flush(10) == 0


def _offsets(bootstrap: str, topic: str, group: str) -> tuple[int, int | None]:
    """End offset of partition 0 (read from the messages: tansu answers ListOffsets per batch, not per
    message) and the group's committed offset there."""
    messages = _read_topic(bootstrap, topic, 10_000, timeout_s=3)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        (tp,) = consumer.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        consumer.close()
    return messages[-1].offset() + 1, (tp.offset if tp.offset >= 0 else None)


def _read_topic(bootstrap: str, topic: str, n: int, timeout_s: float = 20) -> list:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:6]}"})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    out: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                out.append(msg)
        extra = consumer.poll(0.5)  # nothing more than expected
        if extra is not None and extra.error() is None:
            out.append(extra)
    finally:
        consumer.close()
    return out


def _applied_ids(out: Path) -> list[str]:
    _, meta = read_state(out / "state")
    return [i for m in [*meta["merged"], *meta["pending"], meta["active"]] for i in m["edit_ids"]]


@pytest.fixture
def names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"edits-{tag}", f"job-{tag}"


def test_kafka_job_applies_valid_edits_dead_letters_invalid_and_commits(
    ray_local, kafka_broker, job_files, tmp_path, names, capsys
):
    topic, group = names
    bootstrap = kafka_broker.bootstrap
    _produce(tmp_path, bootstrap, topic, _edits(job_files, 0, 3), capsys)
    _produce_raw(bootstrap, topic, INVALID)
    _produce(tmp_path, bootstrap, topic, _edits(job_files, 3, 3), capsys)
    out = tmp_path / "out"
    cfg = load_config(job_files, [f"output.dir={out}", "max_edits=6", *_kafka(bootstrap, topic, group)])
    report = run_job(cfg)
    assert report["edits_applied"] == 6 and report["duplicates_applied"] == 0 and report["edits_lost"] == 0
    assert report["dead_lettered"] == 2 and report["dead_letter"] == f"kafka:{topic}.dead-letter"
    assert _applied_ids(out) == [f"u{i}" for i in range(6)]
    dead = _read_topic(bootstrap, f"{topic}.dead-letter", 2)
    assert sorted(m.value() for m in dead) == sorted(INVALID)
    assert all(dict(m.headers())[HEADER_REASON] for m in dead)
    assert _offsets(bootstrap, topic, group) == (8, 8)
    lags = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lags = [x for x in lags if x.get("kind") == "lag"]
    assert lags and lags[-1]["lag_total"] == 0 and lags[-1]["lag"] == {f"{topic}[0]": 0}


# ------------------------------------------------------------------------------------- subprocess runs


def _checkpointed_applied(jobproc, out: Path, save_freq: int = 4) -> int:
    """Edits applied in the last checkpoint: stored shards plus the progress of open ones (the memory file
    names end with their number of edits, see ``checkpoint.memory_name``)."""
    ck = jobproc.committed(out)
    open_ = sum(int(s["memory"].rsplit("-", 1)[1].split(".")[0]) for s in ck.get("shards", []))
    return ck.get("next_store", 0) * save_freq + open_


def test_kill_9_mid_stream_then_the_same_command_applies_every_edit_once(
    kafka_broker, job_files, tmp_path, names, capsys, jobproc
):
    topic, group = names
    bootstrap = kafka_broker.bootstrap
    _produce(tmp_path, bootstrap, topic, _edits(job_files, 0, 12), capsys)
    out = tmp_path / "killed"
    cmd = [*_kafka(bootstrap, topic, group), n_iter(40), "max_edits=12", "checkpoint.every=1"]
    proc = jobproc.start(job_files, out, *cmd)
    jobproc.wait_for(
        lambda: jobproc.committed(out).get("next_store", 0) >= 1 and jobproc.committed(out).get("shards"),
        proc,
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _checkpointed_applied(jobproc, out) < 12
    proc = jobproc.start(job_files, out, *cmd)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from"]["edits_applied"] > 0
    assert report["edits_applied"] == 12 and report["duplicates_applied"] == 0 and report["edits_lost"] == 0
    assert report["edits_applied_this_run"] == 12 - report["resumed_from"]["edits_applied"]
    assert _applied_ids(out) == [f"u{i}" for i in range(12)]
    assert _offsets(bootstrap, topic, group) == (12, 12)


def test_long_running_job_stops_on_sigterm_and_the_next_run_resumes_from_committed_offsets(
    ray_local, kafka_broker, job_files, tmp_path, names, capsys, jobproc
):
    topic, group = names
    bootstrap = kafka_broker.bootstrap
    _produce(tmp_path, bootstrap, topic, _edits(job_files, 0, 6), capsys)
    out = tmp_path / "long"
    proc = jobproc.start(job_files, out, *_kafka(bootstrap, topic, group))  # no max_edits: runs until stopped
    # a quiet topic: the partial last shard (edits 4-5) is trained without waiting for a full one
    jobproc.wait_for(lambda: _checkpointed_applied(jobproc, out) == 6, proc)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["stopped_by_signal"] and report["edits_applied"] == 6 and report["edits_lost"] == 0
    assert _offsets(bootstrap, topic, group) == (6, 6)

    _produce(tmp_path, bootstrap, topic, _edits(job_files, 6, 4), capsys)
    cfg = load_config(job_files, [f"output.dir={out}", "max_edits=10", *_kafka(bootstrap, topic, group)])
    second = run_job(cfg)
    assert second["resumed_from"]["edits_applied"] == 6 and second["edits_applied_this_run"] == 4
    assert second["edits_applied"] == 10 and second["duplicates_applied"] == 0 and second["edits_lost"] == 0
    assert second["duplicates_skipped"] == 0  # read from the committed offsets, not from the start
    assert _applied_ids(out) == [f"u{i}" for i in range(10)]
    assert _offsets(bootstrap, topic, group) == (10, 10)


def test_kafka_stream_config_is_validated_at_load_time(job_files):
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match="stream.kind=kafka requires stream.bootstrap, stream.group"):
        load_config(job_files, ["stream.kind=kafka", "stream.path=null", "stream.topic=t"])
    with pytest.raises(ConfigError, match="enable.auto.commit is set by wisestream"):
        load_config(job_files, [*_kafka("b:9092", "t", "g"), "stream.client={enable.auto.commit: true}"])
    with pytest.raises(ConfigError, match="stream.topic are only used with stream.kind=kafka"):
        load_config(job_files, ["stream.topic=t"])
    cfg = load_config(job_files, [*_kafka("b:9092", "t", "g"), "stream.client={security.protocol: SASL_SSL}"])
    settings = cfg.stream.kafka_settings()
    assert (
        settings.client == {"security.protocol": "SASL_SSL"} and settings.dead_letter_topic == "t.dead-letter"
    )
