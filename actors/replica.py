"""Loading one model replica inside an actor (the driver resolves the path; actors only load it)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Where a replica comes from and where it runs.

    Attributes:
        path: local checkpoint directory (already materialised by the driver).
        dtype: ``float32`` | ``bfloat16`` | ``float16``.
        device: ``auto`` (CUDA when this process sees a GPU), ``cpu``, ``cuda``, ``cuda:1``, ...
        threads: torch intra-op threads (the actor's CPU share); 0 keeps torch's default.
    """

    path: str
    dtype: str = "float32"
    device: str = "auto"
    threads: int = 0


class ReplicaError(RuntimeError):
    """The replica's model cannot be loaded."""


def load_replica(spec: ModelSpec):
    """Load ``(model, tokenizer)`` for one replica, frozen and in eval mode.

    Raises:
        ReplicaError: the checkpoint cannot be loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=getattr(torch, spec.dtype))
        tokenizer = AutoTokenizer.from_pretrained(spec.path)
    except OSError as err:
        raise ReplicaError(f"model {spec.path!r} could not be loaded: {err}") from err
    logger.info(
        "replica of %s on %s (pid %d, %d threads)", spec.path, device, os.getpid(), torch.get_num_threads()
    )
    return model.to(device).eval(), tokenizer
