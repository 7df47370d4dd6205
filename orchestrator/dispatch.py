"""Handing shards to the editor actors.

Each idle editor gets a group of up to ``runtime.shards_per_editor`` ready shards, the ones it trained last
first (they are cached in it), and trains them in lock step for up to ``checkpoint.every`` edits each. A fresh
shard carries the task vector it starts from (WISE-Merge's merged memory); one under way carries its progress.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from actors.editor import Edit, ShardSpec
from actors.replica import ModelSpec
from orchestrator import cluster
from orchestrator.config import RuntimeConfig
from orchestrator.errors import JobError
from orchestrator.scheduler import ShardBook, ShardTask
from wise.config import WiseConfig
from wise.memory import MemoryBank

logger = logging.getLogger(__name__)


def shard_specs(group: list[ShardTask], base: torch.Tensor | None) -> list[ShardSpec]:
    """What an editor needs to train ``group``: each shard's edits, and its progress or, fresh, ``base``."""
    base = None if base is None else base.detach().cpu()  # one copy for the group's fresh shards
    return [
        ShardSpec(
            t.shard_id,
            t.start,
            tuple(Edit(r.id, r.prompt, r.target, r.subject) for r in t.records),
            t.progress,
            None if t.progress is not None else base,
        )
        for t in group
    ]


class EditorPool:
    """The job's editor actors and the editor calls in flight on them.

    Args:
        rt: ``runtime`` settings (editors, shards per editor, resources).
        cfg: WISE settings (identical on every editor).
        every: edits per shard per editor call (``checkpoint.every``): the job checkpoints after each call.

    Attributes:
        actors: one actor handle per editor; index ``w`` is editor ``w``.
        inflight: editor call -> (editor, ids of the shards it trains).
        setup: the templates and margins every editor trains with (from the first editor, or a checkpoint).
    """

    def __init__(self, rt: RuntimeConfig, cfg: WiseConfig, every: int | None) -> None:
        self.rt = rt
        self.cfg = cfg
        self.every = every
        self.actors: list[Any] = []
        self.inflight: dict[Any, tuple[int, list[int]]] = {}
        self.setup: dict | None = None
        self._model: ModelSpec | None = None
        self._irrelevant: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.actors)

    def start(self, model: ModelSpec, irrelevant: list[tuple[str, str]], setup: dict | None) -> dict:
        """Start the first editor and wait for it (it derives the setup when ``setup`` is None), then create the
        others with its setup; :meth:`wait_ready` waits for them.

        Returns:
            The first editor's ``info()``: setup, edited weight's shape, module path and dtype.

        Raises:
            JobError: the first editor could not start.
        """
        import ray

        self._model, self._irrelevant = model, irrelevant
        first = cluster.editor_actor(self.rt, model, self.cfg, irrelevant, setup)
        try:
            info = ray.get(first.info.remote())
        except ray.exceptions.RayActorError as err:
            raise JobError(f"the first editor could not start: {err}") from err
        self.setup = setup or info["setup"]
        self.actors = [first] + [self._new_actor() for _ in range(self.rt.editors - 1)]
        return info

    def wait_ready(self) -> None:
        """Wait until every editor has loaded its model.

        Raises:
            JobError: an editor could not start.
        """
        import ray

        try:
            ray.get([e.info.remote() for e in self.actors[1:]])
        except ray.exceptions.RayActorError as err:
            raise JobError(f"an editor could not start: {err}") from err

    def _new_actor(self) -> Any:
        assert self._model is not None, "start() first"
        return cluster.editor_actor(self.rt, self._model, self.cfg, self._irrelevant, self.setup)

    def dispatch(
        self, book: ShardBook, bank: MemoryBank, stream_done: bool, stopping: Callable[[], bool]
    ) -> None:
        """Hand every idle editor its next group of ready shards (a partial last shard only when
        ``stream_done``), until the job is ``stopping`` or no shard is ready."""
        busy = {w for w, _ in self.inflight.values()}
        for w, editor in enumerate(self.actors):
            if w in busy:
                continue
            if stopping():
                break
            group = book.next_group(w, stream_done, self.rt.shards_per_editor)
            if not group:
                break
            specs = shard_specs(group, bank.base())
            book.assign(group, w)
            self.inflight[editor.train.remote(specs, self.every)] = (w, [t.shard_id for t in group])

    def wait(self, others: Iterable[Any], timeout: float | None) -> list[Any]:
        """The first of the editor calls in flight and ``others`` to finish (none after ``timeout`` seconds)."""
        import ray

        done, _ = ray.wait([*self.inflight, *others], num_returns=1, timeout=timeout)
        return done

    def take(self, ref: Any) -> tuple[int, list[int]]:
        """Forget a finished editor call; returns its editor and shard ids."""
        return self.inflight.pop(ref)

    def replace(self, worker: int) -> None:
        """Start a new editor in place of ``worker`` (it died)."""
        self.actors[worker] = self._new_actor()

    def kill(self) -> None:
        """Stop every editor (idempotent)."""
        if not self.actors:
            return
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
        self.inflight = {}
