"""Job-test fixtures: the CLI job as a subprocess (the tiny model's job files are in tests/conftest.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import WaitTimeout, wait_for


class JobProcess:
    """The CLI job as a subprocess (for kill -9 and SIGTERM tests), and its committed checkpoint."""

    @staticmethod
    def start(config: Path, out: Path, *extra: str) -> subprocess.Popen:
        args = [sys.executable, "-m", "wisestream", "run", str(config), "--set", f"output.dir={out}"]
        for e in extra:
            args += ["--set", e]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)  # the job starts its own local Ray instance
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)

    @staticmethod
    def wait_for(pred, proc: subprocess.Popen, timeout: float = 240) -> None:
        """Wait until ``pred()`` holds; fail at once if the job ends first, kill it if it never holds."""

        def holds() -> bool:
            if pred():
                return True
            if proc.poll() is not None:
                raise AssertionError(f"job ended early:\n{proc.stdout.read()[-3000:]}")
            return False

        try:
            wait_for(holds, timeout, what="the job's condition", interval=0.05)
        except WaitTimeout as err:
            proc.kill()
            raise AssertionError(f"{err}:\n{proc.stdout.read()[-3000:]}") from None

    @staticmethod
    def committed(out: Path) -> dict:
        try:
            return json.loads((out / "checkpoint" / "checkpoint.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}


@pytest.fixture
def jobproc() -> type[JobProcess]:
    return JobProcess
