"""`wisestream serve` as a user runs it: a subprocess serving a saved WISE state on a real vLLM replica (its own
local Ray), answering the OpenAI API, following the state directory with --watch, and stopping on SIGTERM.

The state is the in-process WISE editor's, after two edits on the tiny random Llama: serving needs no long
training, only a real architecture, tokenizer and side memories. About 1.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import free_port, wait_for

from streams import EditRecord
from wise.config import WiseConfig
from wise.editor import WiseEditor
from wise.state import read_state, write_state


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.load(resp)


@pytest.fixture
def tiny_state(tmp_path, tiny_tokenizer, vllm_tiny_model):
    """A WISE state with two side memories (one edit each) on a tiny random Llama vLLM can serve, saved next to
    the model."""
    tiny_model = vllm_tiny_model
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    cfg = WiseConfig(
        layout="shards", layer=1, n_iter=5, save_freq=1, merge_freq=1, retrieve=True, n_irrelevant=2
    )
    editor = WiseEditor(
        tiny_model, tiny_tokenizer, cfg, irrelevant=[("The sky is", "blue"), ("Water is", "wet")]
    )
    editor.apply(
        [
            EditRecord(id="a", prompt="The capital of Sweden is", target="piano"),
            EditRecord(id="b", prompt="Tokyo plays the", target="violin"),
        ]
    )
    state = write_state(tmp_path / "state", *editor.state_dict())
    return model_dir, state


def test_serve_cli_serves_follows_the_state_and_stops_on_sigterm(tiny_state, tmp_path):
    model_dir, state = tiny_state
    tensors, meta = read_state(state)
    assert len(meta["merged"]) == 2
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "wisestream", "serve", "--checkpoint", str(state), "--model", str(model_dir),
         "--port", str(port), "--watch", "1", "--max-model-len", "256"],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env,
    )  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if line.startswith("serving; Ctrl-C stops"):
                break
        assert lines and lines[-1].startswith("serving"), (
            lines,
            (tmp_path / "serve.log").read_text()[-3000:],
        )
        url = f"http://127.0.0.1:{port}"
        assert f"replica-0: {url}/v1  (version 1)" in "".join(lines)
        assert [m["id"] for m in _get(url + "/v1/models")["data"]] == ["wise"]
        assert _get(url + "/wise/version")["version"] == 1
        body = json.dumps({"model": "wise", "prompt": "The capital of Sweden is", "max_tokens": 3}).encode()
        req = urllib.request.Request(
            url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.load(resp)["usage"]["completion_tokens"] == 3

        # the state changes (a memory is dropped): --watch publishes version 2 holding only one memory
        meta["merged"] = meta["merged"][:1]
        write_state(state, {k: v for k, v in tensors.items() if not k.startswith("merged.1")}, meta)
        info = wait_for(
            lambda: (got := _get(url + "/wise/version"))["version"] >= 2 and got,
            60,
            what="--watch to publish version 2",
            interval=0.5,
        )
        assert info["version"] == 2 and info["memories"] == 1, info
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["version"] == 2


def test_serve_cli_refuses_a_directory_without_a_state(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "wisestream", "serve", "--checkpoint", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode != 0
    assert "holds no checkpoint.json, state/ or wise_state.json" in res.stderr


def test_serve_cli_refuses_non_loopback_without_key(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "wisestream", "serve", "--checkpoint", str(tmp_path), "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode != 0 and "is not loopback" in res.stderr, res.stderr[-2000:]
