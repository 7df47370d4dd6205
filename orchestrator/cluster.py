"""Ray: joining a cluster (or starting a local instance) and creating the job's actors."""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any

from actors.editor import EditorActor
from actors.evaluator import EvaluatorActor
from actors.replica import ModelSpec
from orchestrator.config import RuntimeConfig
from wise.config import WiseConfig

logger = logging.getLogger(__name__)

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect(rt: RuntimeConfig) -> bool:
    """Join the configured Ray cluster, the one a ``ray job submit`` runs in, or start a local instance.

    Returns:
        True when this call started a local instance (and the job should shut it down).
    """
    if not rt.address and not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
        # Ray 2.60 maps 127.0.0.1 to the machine's reachable address; a local single-node instance stays on the
        # loopback interface only when Ray's "no cluster" mode is on (it must be set before ray is imported).
        os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray

    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if rt.address:
        logger.info("joining Ray cluster at %s", rt.address)
        ray.init(address=rt.address, **quiet)
        return False
    if os.environ.get("RAY_ADDRESS"):
        logger.info("joining the Ray cluster of this job (RAY_ADDRESS=%s)", os.environ["RAY_ADDRESS"])
        ray.init(**quiet)
        return False
    logger.info("starting a local Ray instance")
    ray.init(address="local", num_cpus=rt.local_cpus, include_dashboard=False, **quiet)
    return True


def editor_actor(rt: RuntimeConfig, model: ModelSpec, cfg: WiseConfig, irrelevant: list, setup: dict | None):
    """A new editor actor (not restarted by Ray: the job replaces dead editors itself and retrains their shards)."""
    import ray

    threads = max(1, math.floor(rt.editor_cpus))
    spec = ModelSpec(model.path, model.dtype, model.device, threads)
    cls = ray.remote(EditorActor).options(
        num_cpus=rt.editor_cpus, num_gpus=rt.editor_gpus, max_restarts=0, max_concurrency=1
    )
    return cls.remote(spec, cfg, irrelevant, setup)


def evaluator_actor(rt: RuntimeConfig, model: ModelSpec, cfg: WiseConfig):
    """The evaluator actor (one per job)."""
    import ray

    threads = max(1, math.floor(rt.evaluator_cpus))
    spec = ModelSpec(model.path, model.dtype, model.device, threads)
    cls = ray.remote(EvaluatorActor).options(
        num_cpus=rt.evaluator_cpus, num_gpus=rt.evaluator_gpus, max_restarts=1
    )
    return cls.remote(spec, cfg)
