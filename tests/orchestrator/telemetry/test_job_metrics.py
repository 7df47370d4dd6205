"""The job's Prometheus endpoint on a real local Ray (tiny random Llama): scraped over HTTP while the job is
alive, every value agrees with the job's report; a resumed job continues its totals; a taken port is a clear
config error."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.config import ConfigError, load_config
from orchestrator.job import EditJob


def _cfg(config: Path, out: Path, *extra: str):
    return load_config(config, [f"output.dir={out}", "metrics.port=0", *extra])


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (s.name, frozenset((k, v) for k, v in s.labels.items() if k not in ("ray_job_id", "model"))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def get(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def run_and_scrape(cfg) -> tuple[dict, dict]:
    job = EditJob(cfg)
    try:
        job.setup()
        report = job.run()
        return report, scrape(report["runtime"]["metrics_url"])
    finally:
        job.cleanup()


def test_scraped_metrics_agree_with_the_report(ray_local, job_files, tmp_path):
    cfg = _cfg(job_files, tmp_path / "m", "max_edits=10", "eval.every=4", "eval.sample=2", "eval.recent=3")
    report, m = run_and_scrape(cfg)
    assert report["edits_applied"] == 10
    assert get(m, "wisestream_edits_applied_total") == 10
    assert get(m, "wisestream_edits_seen_total") == report["edits_seen"] == 10
    assert get(m, "wisestream_edits_dead_lettered_total") == 0
    assert get(m, "wisestream_edits_pending") == 0
    assert get(m, "wisestream_edit_latency_seconds_count") == 10
    assert get(m, "wisestream_checkpoints_total") == report["runtime"]["checkpoints"]
    assert get(m, "wisestream_checkpoint_age_seconds") < 120
    assert get(m, "wisestream_stream_position", partition="file") == 10
    # 4-edit shards merged every 8 edits: 2 shards stored, 1 merge; the last 2 edits are the active shard
    assert get(m, "wisestream_shards_trained_total") == 2
    assert get(m, "wisestream_merges_total") == 1 and get(m, "wisestream_merge_duration_seconds_count") == 1
    assert get(m, "wisestream_side_memories", state="merged") == 1
    assert get(m, "wisestream_side_memory_bytes") > 0
    # the final measurement: over all edits exactly the report's numbers; the 3 most recent edits per edit
    for metric in ("reliability", "generalization", "locality"):
        assert get(m, "wisestream_retention", metric=metric, scope="all") == report["retention"][metric]
    recent = [e for e in report["per_edit"] if e["id"] in {"u7", "u8", "u9"}]
    assert get(m, "wisestream_retention", metric="reliability", scope="recent") == pytest.approx(
        sum(e["reliability"] for e in recent) / 3
    )
    assert get(m, "wisestream_retention_edits", scope="all") == 10
    # the continuous measurements carried their recent window too
    assert [e["recent"]["edits"] for e in report["evaluations"]] == [3, 3]


def test_a_resumed_job_continues_its_totals(ray_local, job_files, tmp_path):
    out = tmp_path / "r"
    run_and_scrape(_cfg(job_files, out, "max_edits=4"))
    report, m = run_and_scrape(_cfg(job_files, out, "max_edits=6"))
    assert report["edits_applied_this_run"] == 2
    assert get(m, "wisestream_edits_applied_total") == 6
    assert get(m, "wisestream_edits_seen_total") == report["edits_seen"] == 6
    assert get(m, "wisestream_edit_latency_seconds_count") == 2  # only edits that arrived in this run


def test_a_taken_port_is_a_config_error(ray_local, job_files, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        job = EditJob(_cfg(job_files, tmp_path / "p", f"metrics.port={port}"))
        try:
            with pytest.raises(ConfigError, match=rf"metrics.port: cannot serve metrics on 127.0.0.1:{port}"):
                job.setup()
        finally:
            job.cleanup()
