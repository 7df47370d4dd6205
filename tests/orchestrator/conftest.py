"""Job-test fixtures: the tiny model saved as a real checkpoint, a synthetic edit stream and a job config."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture
def model_dir(tmp_path, tiny_model, tiny_tokenizer):
    d = tmp_path / "tiny"
    tiny_model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


SUBJECTS = ["Paris", "Tokyo", "Berlin", "Sweden", "Madrid", "Brazil", "France", "Spain", "Italian", "English"]
RELATIONS = ["The capital of {} is", "The mother tongue of {} is", "{} plays the", "{} is located in"]
TARGETS = ["piano", "violin", "Islam", "French", "Portuguese", "guitar", "uniform", "Christianity"]


def make_edits(n: int) -> list[dict]:
    out = []
    for i in range(n):
        subj = SUBJECTS[i % len(SUBJECTS)]
        rel = RELATIONS[(i // len(SUBJECTS)) % len(RELATIONS)]
        out.append(
            {
                "id": f"u{i}",
                "prompt": rel.format(subj),
                "target": TARGETS[i % len(TARGETS)],
                "rephrase": [f"{rel.format(subj)} indeed"],
                "locality_prompt": RELATIONS[(i + 1) % len(RELATIONS)].format(
                    SUBJECTS[(i + 3) % len(SUBJECTS)]
                ),
                "locality_answer": TARGETS[(i + 2) % len(TARGETS)],
            }
        )
    return out


@pytest.fixture
def job_files(tmp_path, model_dir):
    """A stream of 24 edits, a disjoint irrelevant pool, and a YAML config using the tiny model."""
    data = tmp_path / "edits.jsonl"
    data.write_text("\n".join(json.dumps(e) for e in make_edits(24)) + "\n")
    pool = tmp_path / "pool.jsonl"
    pool_recs = [
        {
            "id": f"p{i}",
            "prompt": f"Where is {s}?",
            "target": "x",
            "locality_prompt": f"{s} is in",
            "locality_answer": t,
        }
        for i, (s, t) in enumerate(zip(SUBJECTS, TARGETS * 2, strict=False))
    ]
    pool.write_text("\n".join(json.dumps(e) for e in pool_recs) + "\n")
    config = tmp_path / "job.yaml"
    config.write_text(
        f"""
model: {{name: {model_dir}}}
stream: {{path: {data}, format: jsonl}}
irrelevant: {{path: {pool}, format: jsonl}}
wise:
  layer: 2
  n_iter: 8
  early_stop_loss: 0.0
  templates: {{count: 2, length: 3}}
  save_freq: 4
  merge_freq: 8
  n_irrelevant: 3
  hard_negatives: 0.34
  margins: {{alpha: 0.5, beta: 2.0, gamma: 1.0, scale: auto}}
eval: {{generate: false}}
"""
    )
    return config


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
        deadline = time.monotonic() + timeout
        while not pred():
            if proc.poll() is not None:
                raise AssertionError(f"job ended early:\n{proc.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"timed out:\n{proc.stdout.read()[-3000:]}")
            time.sleep(0.05)

    @staticmethod
    def committed(out: Path) -> dict:
        try:
            return json.loads((out / "checkpoint" / "checkpoint.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}


@pytest.fixture
def jobproc() -> type[JobProcess]:
    return JobProcess
