"""User errors end in one ``error: ...`` line on stderr and a non-zero exit, never in a traceback: another job's
checkpoint, missing files, malformed edit files, an unreachable Ray cluster or Kafka broker. A bug still raises.

Jobs use the tiny random Llama (``job_files``); every error here comes before any training. The Ray cases run the
CLI as a subprocess: in this process a test-session Ray instance may already be up, and the job would join it.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

import pytest
from helpers import free_port

from orchestrator.checkpoint import CheckpointStore
from wisestream import cli
from wisestream.cli import main


def error_line(err: str, *names: str) -> str:
    """The one ``error:`` line of ``err`` (stderr), checked to name each of ``names``; no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(("error: ", "config error: "))]
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def run_args(job_files, tmp_path, *overrides: str) -> list[str]:
    args = ["run", str(job_files), "--set", f"output.dir={tmp_path / 'out'}"]
    for o in overrides:
        args += ["--set", o]
    return args


def test_a_checkpoint_of_another_job(job_files, tmp_path, capsys):
    ckpt = tmp_path / "out" / "checkpoint"
    CheckpointStore(ckpt, {"stream": str(tmp_path / "other.jsonl")}).commit({})
    assert main(run_args(job_files, tmp_path)) == 1
    line = error_line(capsys.readouterr().err, f"{ckpt / 'checkpoint.json'} belongs to another job", "stream")
    assert f"delete {ckpt} to start over" in line


def test_a_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    line = error_line(capsys.readouterr().err, f"config file {tmp_path / 'nope.yaml'} does not exist")
    assert line.startswith("config error: ")


@pytest.mark.parametrize("key", ["stream.path", "irrelevant.path"])
def test_a_missing_edit_file(key, job_files, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(run_args(job_files, tmp_path, f"{key}={missing}")) == 1
    error_line(capsys.readouterr().err, f"edit source not found: {missing}")


def test_serve_a_missing_checkpoint_dir(tmp_path, capsys):
    missing = tmp_path / "runs" / "nope"
    assert main(["serve", "--checkpoint", str(missing)]) == 1
    error_line(capsys.readouterr().err, f"{missing} does not exist", "checkpoint")


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("edits.json", "this is not json\n", "is not valid JSON"),
        ("edits.json", json.dumps({"id": "e0", "prompt": "p", "target": "t"}), "must hold a JSON list"),
        ("edits.jsonl", json.dumps({"question": "q", "answer": "a"}) + "\n", "cannot detect the layout"),
    ],
)
def test_a_malformed_edit_file(name, text, says, job_files, tmp_path, capsys):
    bad = tmp_path / name
    bad.write_text(text)
    assert main(run_args(job_files, tmp_path, f"stream.path={bad}", "stream.format=auto")) == 1
    error_line(capsys.readouterr().err, str(bad), says)


@pytest.mark.parametrize("via", ["runtime.address", "RAY_ADDRESS"])
def test_an_unreachable_ray_cluster(via, job_files, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = run_args(job_files, tmp_path)
    if via == "RAY_ADDRESS":
        env["RAY_ADDRESS"] = address
    else:
        env.pop("RAY_ADDRESS", None)
        args += ["--set", f"runtime.address={address}"]
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "wisestream", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 1, res.stderr[-3000:]
    line = error_line(res.stderr, f"no Ray cluster at {address} ({via})", "ray start --head")
    assert f"fix {via}" in line
    assert time.monotonic() - started < 120  # ray.init alone retries such an address for minutes


def test_an_unreachable_kafka_broker_for_a_job(model_dir, tmp_path, capsys, caplog):
    bootstrap = f"127.0.0.1:{free_port()}"  # no broker listens there
    config = tmp_path / "kafka.yaml"
    config.write_text(
        f"model: {{name: {model_dir}}}\n"
        f"stream: {{kind: kafka, bootstrap: '{bootstrap}', topic: edits, group: job, connect_timeout_s: 1}}\n"
    )
    assert main(["run", str(config), "--set", f"output.dir={tmp_path / 'out'}"]) == 1
    error_line(
        capsys.readouterr().err, f"Kafka broker at {bootstrap} unreachable", "check that the broker runs"
    )
    # not librdkafka's own error line per failed connection attempt (dozens a second): they are --verbose only
    assert not [r for r in caplog.records if r.name == "streams.kafka.rdkafka"]


def test_an_unreachable_kafka_broker_for_produce(tmp_path, capsys):
    bootstrap = f"127.0.0.1:{free_port()}"
    data = tmp_path / "edits.jsonl"
    data.write_text(json.dumps({"id": "e0", "prompt": "p", "target": "t"}) + "\n")
    args = ["produce", "--data", str(data), "--topic", "edits", "--bootstrap", bootstrap]
    assert main([*args, "--connect-timeout", "1"]) == 1
    error_line(capsys.readouterr().err, f"Kafka broker at {bootstrap} unreachable")


def test_an_invalid_topic_name_for_produce(tmp_path, capsys):
    args = ["produce", "--data", str(tmp_path / "edits.jsonl"), "--topic", "my edits", "--bootstrap", "h:1"]
    assert main(args) == 2
    error_line(capsys.readouterr().err, "--topic: 'my edits' is not a valid Kafka topic name")


def test_verbose_adds_the_traceback_of_a_user_error(tmp_path, capsys):
    assert main(["--verbose", "run", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err
    assert err.splitlines()[-1].startswith("config error: config file")


def test_a_bug_is_not_a_user_error(monkeypatch):
    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_model", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["model"])


def test_user_errors_name_classes_that_exist():
    for module, name in cli.USER_ERRORS:
        assert issubclass(getattr(importlib.import_module(module), name), Exception), (module, name)
