"""Ray: joining a cluster (or starting a local instance) and creating the job's actors."""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from typing import Any

from actors.editor import EditorActor
from actors.evaluator import EvaluatorActor
from actors.replica import ModelSpec
from orchestrator.config import RuntimeConfig
from wise.config import WiseConfig

logger = logging.getLogger(__name__)

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: Longest wait for the address of a cluster to join to accept a connection. ``ray.init`` itself retries an
#: address where nothing listens for many minutes before it gives up.
REACH_TIMEOUT_S = 5.0


class ClusterError(RuntimeError):
    """The Ray cluster to join cannot be reached."""


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` or ``ray://host:port`` address; None for Ray's other forms
    (``auto``, ``local``), which ``ray.init`` resolves itself."""
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or "/" in rest:
        return None
    return host.strip("[]"), int(port)


def _init(address: str | None, setting: str, **kwargs: Any) -> None:
    """``ray.init`` joining ``address`` (None: ``RAY_ADDRESS``), named by ``setting`` in errors.

    Raises:
        ClusterError: nothing accepts connections at the address, or Ray finds no cluster there.
    """
    import ray

    target = address or os.environ["RAY_ADDRESS"]
    fix = f"start one there (`ray start --head`), or fix {setting} (or unset it for a local instance)"
    endpoint = _host_port(target)
    if endpoint is not None:
        try:
            socket.create_connection(endpoint, timeout=REACH_TIMEOUT_S).close()
        except OSError as err:
            timed_out = isinstance(err, TimeoutError)
            reason = f"no answer within {REACH_TIMEOUT_S:g} s" if timed_out else err.strerror or str(err)
            raise ClusterError(f"no Ray cluster at {target} ({setting}): {reason}; {fix}") from err
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as err:
        raise ClusterError(f"cannot join the Ray cluster at {target} ({setting}): {err}; {fix}") from err


def connect(rt: RuntimeConfig) -> bool:
    """Join the configured Ray cluster, the one a ``ray job submit`` runs in, or start a local instance.

    Returns:
        True when this call started a local instance (and the job should shut it down).

    Raises:
        ClusterError: ``runtime.address`` or ``RAY_ADDRESS`` names a cluster that cannot be reached.
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
        _init(rt.address, "runtime.address", **quiet)
        return False
    if os.environ.get("RAY_ADDRESS"):
        logger.info("joining the Ray cluster of this job (RAY_ADDRESS=%s)", os.environ["RAY_ADDRESS"])
        _init(None, "RAY_ADDRESS", **quiet)
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
