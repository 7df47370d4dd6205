"""A real Prometheus (deploy/prometheus/prometheus.yml and alerts.yml, scraping every second) scrapes a short job
on the embedded model; then, through Prometheus' HTTP API, every dashboard query and alert expression is
valid and returns data or an empty vector, the alert rules evaluate without error, and the retention gauges
equal the job's report.

About 1 min on 2 idle CPU cores (two model replicas load, 2 edits, a final measurement with generation)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from helpers import wait_for

from orchestrator.config import load_config
from orchestrator.job import EditJob

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.model


def prometheus_config(target: str) -> dict:
    """deploy/prometheus/prometheus.yml with the job's exporter as the wisestream target, every second."""
    cfg = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(ROOT / "deploy" / "prometheus" / "alerts.yml")]
    (job,) = [s for s in cfg["scrape_configs"] if s["job_name"] == "wisestream"]
    job["static_configs"] = [{"targets": [target]}]
    return cfg


def test_dashboard_and_alert_queries_on_a_real_job(tmp_path, ray_local, prometheus_factory, deploy_files):
    cfg = load_config(
        ROOT / "configs" / "default.yaml",
        [
            "max_edits=2",  # one 2-edit shard: stored and merged
            "wise.save_freq=2",
            "wise.merge_freq=2",
            "wise.keyed.n_iter=10",
            # a cheaper editor set-up than the default's (quality is not the point here)
            "wise.templates.count=1",
            "irrelevant.limit=32",
            "runtime.shards_per_editor=1",
            "eval.every=2",
            "eval.sample=2",
            "eval.recent=1",
            "eval.generate=true",
            "metrics.port=0",
            f"output.dir={tmp_path / 'run'}",
        ],
    )
    job = EditJob(cfg)
    try:
        job.setup()
        assert job.observer is not None and job.observer.address
        target = job.observer.address.removeprefix("http://").removesuffix("/metrics")
        prom = prometheus_factory(prometheus_config(target))
        wait_for(
            lambda: prom.query('up{job="wisestream"} == 1')["result"],
            30,
            what="the first scrape of the job",
            interval=0.5,
        )
        report = job.run()

        # the final measurement reaches Prometheus: the gauges over all past edits equal the report
        expected = {
            **report["retention"],
            **{f"generate_{k}": v for k, v in report["retention_generate"].items()},
        }

        def scraped_retention() -> dict[str, float] | None:
            result = prom.query('wisestream_retention{scope="all"}')["result"]
            got = {r["metric"]["metric"]: float(r["value"][1]) for r in result}
            return got if all(got.get(k) == v for k, v in expected.items() if v is not None) else None

        got = wait_for(
            scraped_retention, 20, what=f"retention gauges equal to the report {expected}", interval=0.5
        )
        assert got["reliability"] == report["retention"]["reliability"]
        assert got["generate_reliability"] == report["retention_generate"]["reliability"]
        recent = prom.query('wisestream_retention{scope="recent", metric="reliability"}')["result"]
        assert len(recent) == 1 and 0.0 <= float(recent[0]["value"][1]) <= 1.0
        applied = prom.query("wisestream_edits_applied_total")["result"]
        assert [float(r["value"][1]) for r in applied] == [report["edits_applied"]]

        # every dashboard query: valid; data wherever all the metrics it reads have series (a file stream has
        # no consumer lag, and no serving replica runs here)
        present = set(prom.api("label/__name__/values"))
        at = time.time()
        for title, expr in deploy_files.dashboard_queries():
            query = deploy_files.substitute(expr)
            data = prom.query(query, at=at)
            assert data["resultType"] in ("vector", "scalar"), (title, data)
            if deploy_files.metric_names(query) <= present:
                assert data["result"], f"{title}: no data for {query}"
        # every alert expression: valid, an (empty or not) vector
        for rule in deploy_files.alert_rules():
            data = prom.query(rule["expr"], at=at)
            assert data["resultType"] == "vector", (rule["alert"], data)
        # and Prometheus evaluates the loaded rules without error
        groups = wait_for(
            lambda: [
                g
                for g in prom.api("rules")["groups"]
                if g["rules"] and all(r.get("health") == "ok" for r in g["rules"])
            ],
            20,
            what="the alert rules to evaluate",
            interval=0.5,
        )
        assert sum(len(g["rules"]) for g in groups) == len(deploy_files.alert_rules())
    finally:
        job.cleanup()
