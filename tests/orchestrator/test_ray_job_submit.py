"""`ray job submit` of a job to a real Ray head started on 127.0.0.1 (its own temp dir and ports, torn down by
killing exactly its processes, so that a test-session Ray instance on the same machine is left alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from helpers import WaitTimeout, free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head():
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    port, dash, agent, client = (free_port() for _ in range(4))
    # loopback only (see orchestrator.cluster); the CLI sends the token that `ray start` writes to ~/.ray
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        # Ray's fixed default ports would collide with a head that is still shutting down
        "--dashboard-agent-listen-port",
        str(agent),
        "--ray-client-server-port",
        str(client),
        "--num-cpus",
        "2",
        "--temp-dir",
        temp,
        "--disable-usage-stats",
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}", env, port
    finally:
        # `ray stop` would stop every Ray instance of this machine: kill exactly this head's processes (found by
        # their temp dir or GCS port) and their descendants (agents rename themselves, e.g. ray::DashboardAgent)
        ours = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if temp in cmd or f"127.0.0.1:{port}" in cmd:
                    ours += [p, *p.children(recursive=True)]
            except psutil.Error:
                continue
        for p in ours:
            try:
                p.kill()
            except psutil.Error:
                continue


def test_ray_job_submit_runs_the_job_and_prints_the_report(ray_head, job_files, tmp_path):
    address, env, _ = ray_head
    out = tmp_path / "submitted"
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(ROOT),
        "--",
        "wisestream",
        "run",
        str(job_files),
        "--set",
        f"output.dir={out}",
        "--set",
        "max_edits=6",
    ]
    tries: list[subprocess.CompletedProcess] = []

    def submitted() -> bool:  # the dashboard's job server comes up a little after `ray start` returns
        tries.append(subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600))
        text = tries[-1].stdout + tries[-1].stderr
        return tries[-1].returncode == 0 or not ("Failed to connect" in text or "No available agent" in text)

    try:
        wait_for(submitted, 120, what="the job server to accept the job", interval=2)
    except WaitTimeout as err:
        raise AssertionError(f"{err}:\n{(tries[-1].stdout + tries[-1].stderr)[-4000:]}") from None
    proc = tries[-1]
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log and "Retention after 6 sequential edits" in log, log[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["edits_applied"] == 6 and report["duplicates_applied"] == 0
    # the driver joined the cluster it was submitted to rather than starting its own
    assert report["runtime"]["local_ray"] is False
    assert report["runtime"]["ray_address"].endswith(f":{address_port(ray_head)}")


def address_port(head) -> int:
    return int(head[2])
