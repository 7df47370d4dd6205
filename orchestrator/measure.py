"""What the evaluator measures: the editor state a job has built so far, composed from its memory bank and
shard book, with the edits to measure it on (a seeded sample while editing, an even spread at the end)."""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

from orchestrator.config import JobConfig
from orchestrator.scheduler import ShardBook
from wise.factory import empty_shard
from wise.memory import MemoryBank
from wise.state import compose_state

logger = logging.getLogger(__name__)


def spread(items: list, n: int | None) -> list:
    """At most ``n`` items evenly spread over ``items`` (first, last and between), all when ``n`` is None."""
    if n is None or len(items) <= n:
        return list(items)
    if n == 1:
        return [items[-1]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


class StateView:
    """The job's editor state, composed on demand from its bank and shard book.

    Args:
        cfg: the job configuration (``wise``; ``eval``: sample sizes).
        book: accepted records and the shards under way.
        bank: stored and merged memories.
        setup: the editors' templates and margins.
        weight: the edited weight's shape, module path and dtype (from an editor's ``info()``).
    """

    def __init__(
        self,
        cfg: JobConfig,
        book: ShardBook,
        bank: MemoryBank,
        setup: dict,
        weight: tuple[tuple[int, ...], str, str],
    ) -> None:
        self.cfg = cfg
        self.book = book
        self.bank = bank
        self.setup = setup
        self.weight = weight

    def state(self, include_active: bool) -> tuple[dict, dict]:
        """The editor state of everything stored (plus, at the end, the partial last shard)."""
        shape, module_path, dtype = self.weight
        active = self.book.active() if include_active else None
        if active is None:
            active = empty_shard(self.cfg.wise, shape, getattr(torch, dtype), self.book.next_store)
        return compose_state(self.cfg.wise, module_path, shape, self.setup, self.bank, active)

    def eval_inputs(self, stored: int) -> tuple[dict, dict, list, list, list]:
        """What a continuous measurement needs: the stored state, a seeded sample of its edits, the fixed
        locality set (the locality pairs of the stream's first records), and its ``eval.recent`` latest edits."""
        ev = self.cfg.eval
        by_id = {r.id: r for r in self.book.records}
        ids = self.bank.edit_ids()
        sample = [by_id[i] for i in random.Random(stored).sample(ids, min(ev.sample, len(ids)))]
        recent = [by_id[i] for i in ids[-ev.recent :]] if ev.recent else []
        tensors, meta = self.state(include_active=False)
        return tensors, meta, sample, self.book.records[: ev.locality_set], recent

    def measure_final(
        self, evaluator: Any, tensors: dict, meta: dict
    ) -> tuple[list[str], int, dict[str, Any]]:
        """Measure the final state (and the pre-edit model) on at most ``eval.max_records`` of its edits.

        Returns:
            The ids of the edits in the state, in order; how many were measured; and the measurement, with
            ``mean_steps`` (optimisation steps per edit).
        """
        import ray

        ids = [*self.bank.edit_ids(), *meta["active"]["edit_ids"]]
        by_id = {r.id: r for r in self.book.records}
        logger.info("%d edits in the final state; measuring retention", len(ids))
        sample = spread([by_id[i] for i in ids if i in by_id], self.cfg.eval.max_records)
        result = ray.get(
            evaluator.evaluate.remote(tensors, meta, sample, generate=self.cfg.eval.generate, pre=True)
        )
        result["mean_steps"] = self.book.steps / self.book.outcomes if self.book.outcomes else None
        return ids, len(sample), result
