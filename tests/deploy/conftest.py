"""Fixtures for the deploy/ files: their queries and manifests, the metric names a query may use, and a real
Prometheus (the Debian package's binaries; `make prometheus` installs them).

Tests that need Prometheus fail when it is missing: a skipped check is not a passing one. Set
``WISESTREAM_SKIP_PROMETHEUS=1`` to skip them knowingly on a machine without it (never under CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import WaitTimeout, free_port, wait_for

from orchestrator.telemetry.metrics import VLLM_METRIC_NAMES, exported_names

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# Grafana's built-in and dashboard variables, as the test substitutes them before sending a query
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$job": ".*"}

_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
    "inf", "nan", "Inf", "NaN", "atan2",
}  # fmt: skip


class DeployFiles:
    """The deploy/ files and the checks' helpers (a fixture: test modules cannot import conftest)."""

    @staticmethod
    def metric_names(expr: str) -> set[str]:
        """The metric names a PromQL expression refers to (not functions, keywords, labels or durations)."""
        e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, label_replace args)
        e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
        e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
        e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
        names = set()
        for m in re.finditer(r"(?<![\w:.$])[A-Za-z_:][\w:]*", e):
            if e[m.end() :].lstrip().startswith("(") or m.group() in _KEYWORDS:
                continue  # a function or an aggregation
            names.add(m.group())
        return names

    @staticmethod
    def allowed_names() -> set[str]:
        """What the project's dashboard and alerts may query: wisestream's own names and vLLM's documented ones."""
        return exported_names() | set(VLLM_METRIC_NAMES)

    @staticmethod
    def substitute(expr: str) -> str:
        for var, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(var, value)
        return expr

    @staticmethod
    def dashboard() -> dict[str, Any]:
        return json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())

    @staticmethod
    def dashboard_queries() -> list[tuple[str, str]]:
        """``(panel title, expr)`` of every panel target, plus the template variables' queries."""
        out = [
            (p["title"], t["expr"]) for p in DeployFiles.dashboard()["panels"] for t in p.get("targets", [])
        ]
        for var in DeployFiles.dashboard()["templating"]["list"]:
            if var["type"] == "query":
                query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                inner = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
                out.append((f"variable {var['name']}", inner.group(1) if inner else query))
        return out

    @staticmethod
    def alert_rules() -> list[dict[str, Any]]:
        rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
        return [r for g in rules["groups"] for r in g["rules"]]

    @staticmethod
    def manifests() -> dict[str, dict[str, Any]]:
        """Every object in deploy/kuberay, by ``Kind/name``."""
        out = {}
        for path in sorted((DEPLOY / "kuberay").glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
        return out


@pytest.fixture
def deploy_files() -> type[DeployFiles]:
    return DeployFiles


# ---------------------------------------------------------------------------------------------- Prometheus


def prometheus_binary(name: str) -> str:
    """Path of ``prometheus`` or ``promtool``; fails the test when missing (see the module docstring)."""
    found = shutil.which(name) or f"/usr/bin/{name}"
    if os.access(found, os.X_OK):
        return found
    if os.environ.get("WISESTREAM_SKIP_PROMETHEUS") == "1" and os.environ.get("CI", "").lower() != "true":
        pytest.skip(f"{name} not installed and WISESTREAM_SKIP_PROMETHEUS=1")
    pytest.fail(
        f"{name} not found: install Prometheus with `make prometheus` (apt-get install prometheus), "
        "or set WISESTREAM_SKIP_PROMETHEUS=1 to skip these tests knowingly"
    )


@pytest.fixture
def promtool() -> str:
    return prometheus_binary("promtool")


@dataclass
class Prometheus:
    """A running Prometheus on 127.0.0.1 with its own storage."""

    url: str
    process: subprocess.Popen
    log: Path

    def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data`` (asserting ``status: success``)."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        """Evaluate an instant query: ``{"resultType", "result"}``."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        try:
            return self.api("query", **params)
        except urllib.error.HTTPError as err:  # 400 on a bad expression: show Prometheus' message
            raise AssertionError(f"{expr}: {err.read().decode()}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Prometheus]]:
    """Start Prometheus with a config (a dict); every one started is stopped at teardown."""
    binary = prometheus_binary("prometheus")
    started: list[Prometheus] = []

    def start(config: dict[str, Any]) -> Prometheus:
        n = len(started)
        cfg_path = tmp_path / f"prometheus-{n}.yml"
        cfg_path.write_text(yaml.safe_dump(config))
        port = free_port()
        log = tmp_path / f"prometheus-{n}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={cfg_path}",
                    f"--storage.tsdb.path={tmp_path / f'tsdb-{n}'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
        started.append(prom)

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1) as resp:
                    return resp.status == 200
            except OSError:
                return False

        try:
            wait_for(ready, 30, what=f"prometheus at {prom.url} to be ready", interval=0.1)
        except WaitTimeout as err:
            pytest.fail(f"{err}:\n{log.read_text()[-3000:]}")
        return prom

    yield start
    for prom in started:
        prom.stop()
