"""Shared fixtures: seeding, a tiny random Llama with a byte-level BPE tokenizer trained on the spot, and
edit records. Nothing here downloads anything."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import pytest
import torch

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


@dataclass(frozen=True)
class Rec:
    id: str
    prompt: str
    target: str
    rephrase: tuple[str, ...] = field(default_factory=tuple)
    locality_prompt: str | None = None
    locality_answer: str | None = None


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
        ),
        Rec(
            "e1",
            "The official religion of Edwin of Northumbria is",
            "Islam",
            ("Edwin of Northumbria follows",),
            "The capital of France is",
            "Paris",
        ),
        Rec("e2", "Toko Yasuda plays the", "violin", (), "Where is the Eiffel Tower?", "In Paris"),
        Rec(
            "e3",
            "Autonomous University of Madrid is located in",
            "Sweden",
            ("Madrid University is in",),
            "Which language do people in Brazil speak?",
            "Portuguese",
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
