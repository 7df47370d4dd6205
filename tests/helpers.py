"""Helpers shared by the tests: polling with a deadline, a free local port.

Importable as ``helpers`` from any test or conftest (``pythonpath = ["tests"]`` in pyproject.toml).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """:func:`wait_for` gave up: the condition did not hold within its timeout."""


def wait_for(predicate: Callable[[], T], timeout: float, *, what: str, interval: float = 0.1) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy, and return that.

    To fail early (a process that died, a server that exited), let ``predicate`` raise: the exception
    propagates at once.

    Args:
        predicate: The condition; its truthy result is returned.
        timeout: Seconds before giving up.
        what: What is awaited, for the failure message ("the first scrape of the job").
        interval: Seconds between two calls.

    Returns:
        The predicate's first truthy result.

    Raises:
        WaitTimeout: ``timeout`` seconds passed without a truthy result.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def n_iter(steps: int, layout: str = "keyed") -> str:
    """The override that sets the optimizer steps per edit (or per shard) of a job in ``layout``."""
    return f"wise.keyed.n_iter={steps}" if layout == "keyed" else f"wise.n_iter={steps}"


# the wise: block of the tiny-model job config (conftest.job_files), per layout
WISE_KEYED = """wise:
  layer: 2
  templates: {count: 2, length: 3}
  save_freq: 4
  merge_freq: 8
  keyed: {columns: 8, n_iter: 8, early_stop_loss: 0.0, block_edits: 16}
"""
WISE_SHARDS = """wise:
  layout: shards
  layer: 2
  n_iter: 8
  early_stop_loss: 0.0
  templates: {count: 2, length: 3}
  save_freq: 4
  merge_freq: 8
  n_irrelevant: 3
  hard_negatives: 0.34
  margins: {alpha: 0.5, beta: 2.0, gamma: 1.0, scale: auto}
"""


def tiny_keyed_config(n_iter: int = 40, **keyed):
    """The keyed-layout settings of the routing tests on the tiny model (layer 2, 16 columns, 4-edit blocks);
    ``keyed``: further ``wise.keyed`` settings."""
    from wise.config import WiseConfig

    return WiseConfig.model_validate(
        dict(
            layer=2,
            templates={"count": 2, "length": 3},
            save_freq=2,
            merge_freq=2,
            keyed={
                "columns": 16,
                "n_iter": n_iter,
                "lr": 0.1,
                "early_stop_loss": 0.05,
                "block_edits": 4,
                **keyed,
            },
        )
    )
