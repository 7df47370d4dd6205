"""The metrics module: one registry per job, the values each call sets, the HTTP exporter, and the documented
names (module docstring) equal to what is exported."""

from __future__ import annotations

import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import orchestrator.telemetry.metrics as metrics_module
from orchestrator.telemetry.metrics import JobMetrics, exported_names

LABELS = {"ray_job_id": "01000000", "model": "m"}


def value(m: JobMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, {**LABELS, **labels})


def test_every_name_is_documented_in_the_module_docstring():
    doc = metrics_module.__doc__ or ""
    documented = {"wisestream_" + n for n in re.findall(r"^``(\w+)``", doc, flags=re.MULTILINE)}
    # documented as on the wire (``edits_seen_total``, ``job_info``): compare the families
    strip = re.compile(r"_(total|bucket|sum|count|created|info)$")
    assert {strip.sub("", n) for n in documented} == {strip.sub("", n) for n in exported_names()}


def test_two_jobs_in_one_process_have_separate_registries():
    a, b = JobMetrics("1", "m"), JobMetrics("2", "m")
    a.totals({"edits_seen": 3})
    assert a.registry.get_sample_value("wisestream_edits_seen_total", {"ray_job_id": "1", "model": "m"}) == 3
    assert b.registry.get_sample_value("wisestream_edits_seen_total", {"ray_job_id": "2", "model": "m"}) == 0


def test_applied_counter_follows_the_total_and_latency_is_observed_once():
    m = JobMetrics(**LABELS)
    # a resumed job starts from its checkpointed totals; counters follow the job's totals and never go down
    m.totals({"edits_seen": 5, "dead_lettered": 1, "duplicates_skipped": 2, "actor_failures": 0})
    m.edits_applied((), total=4)
    m.totals({"edits_seen": 4})
    assert value(m, "wisestream_edits_applied_total") == 4
    assert value(m, "wisestream_edits_seen_total") == 5
    assert value(m, "wisestream_edits_duplicate_total") == 2
    m.edit_accepted("a", at=100.0)
    m.edit_accepted("b", at=101.0)
    m.edits_applied(["a", "b"], total=6, at=103.0)
    assert value(m, "wisestream_edits_applied_total") == 6
    assert value(m, "wisestream_edit_latency_seconds_count") == 2
    assert value(m, "wisestream_edit_latency_seconds_sum") == pytest.approx(5.0)
    # the same shard retrained after its editor died: neither counted nor observed again
    m.edits_applied(["a", "b"], total=6, at=200.0)
    assert value(m, "wisestream_edits_applied_total") == 6
    assert value(m, "wisestream_edit_latency_seconds_count") == 2


def test_retention_scopes_and_lag_from_sink_measurements():
    m = JobMetrics(**LABELS)
    m.record(
        {
            "edits": 8,
            "time": 50.0,
            "reliability": 0.75,
            "generalization": None,
            "locality": 1.0,
            "locality_fixed": 0.5,
            "sampled": 4,
            "recent": {"edits": 2, "reliability": 1.0, "locality": 0.9},
        }
    )
    assert value(m, "wisestream_retention", metric="reliability", scope="all") == 0.75
    assert value(m, "wisestream_retention", metric="generalization", scope="all") is None
    assert value(m, "wisestream_retention", metric="locality_fixed", scope="all") == 0.5
    assert value(m, "wisestream_retention", metric="reliability", scope="recent") == 1.0
    assert value(m, "wisestream_retention_edits", scope="all") == 8
    assert value(m, "wisestream_retention_timestamp_seconds", scope="recent") == 50.0
    m.record({"kind": "lag", "edits": 8, "lag": {"edits[0]": 3, "edits[1]": 0}, "lag_total": 3})
    assert value(m, "wisestream_consumer_lag_messages", partition="edits[0]") == 3
    with pytest.raises(ValueError, match="scope"):
        m.retention("window", {}, 1)


def test_serving_api():
    m = JobMetrics(**LABELS)
    m.edit_accepted("a")
    m.edit_accepted("b")
    m.publish_succeeded("replica-0", version=3, seconds=0.02)
    m.publish_failed("replica-1", "TimeoutError")
    assert value(m, "wisestream_published_version", replica="replica-0") == 3
    assert value(m, "wisestream_publishes_total", replica="replica-0") == 1
    assert value(m, "wisestream_publish_failures_total", replica="replica-1", error="TimeoutError") == 1
    assert m.edits_served(["a", "b", "unknown"], version=3) == 2
    assert m.edits_served(["a"], version=4) == 0  # already served by version 3
    assert value(m, "wisestream_freshness_seconds_count") == 2


def test_exporter_serves_the_registry_on_a_free_loopback_port():
    m = JobMetrics(**LABELS, stream="data.jsonl")
    m.stream_position({"position": 7})
    m.stream_position({"offsets": [["edits", 0, 11]]})
    m.checkpoint_committed(1.0)
    host, port = m.serve("127.0.0.1", 0)
    try:
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    finally:
        m.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    key = tuple(sorted({**LABELS, "partition": "file"}.items()))
    assert samples[("wisestream_stream_position", key)] == 7
    info = [k for k in samples if k[0] == "wisestream_job_info"]
    assert info and ("stream", "data.jsonl") in info[0][1]
    assert samples[("wisestream_checkpoint_age_seconds", tuple(sorted(LABELS.items())))] > 1e9
    m.close()  # idempotent
