"""Taking what the editors return.

A finished editor call brings each shard's progress: it goes into the shard book, which stores the shards that
are now finished and next in order (merging on cadence). A call whose editor died brings nothing: its shards
are retrained from their first edit on a new editor, until ``runtime.max_actor_failures`` is exceeded.
"""

from __future__ import annotations

import logging
from typing import Any

from tqdm.auto import tqdm

from orchestrator.dispatch import EditorPool
from orchestrator.errors import JobError
from orchestrator.scheduler import ShardBook
from orchestrator.telemetry.observer import JobObserver

logger = logging.getLogger(__name__)


class ResultCollector:
    """Applies finished editor calls to the shard book and replaces dead editors.

    Args:
        editors: the editor pool the calls run on.
        book: where progress goes.
        observer: told about applied edits and stored shards.
        counters: the job's counters (``actor_failures`` is counted here).
        max_failures: editor deaths tolerated (``runtime.max_actor_failures``).
        total: edits the job applies in all (``max_edits``; None: unknown): the progress bar's end (it starts
            at the edits already applied).
    """

    def __init__(
        self,
        editors: EditorPool,
        book: ShardBook,
        observer: JobObserver,
        counters: dict[str, int],
        max_failures: int,
        total: int | None,
    ) -> None:
        self.editors = editors
        self.book = book
        self.observer = observer
        self.counters = counters
        self.max_failures = max_failures
        self.bar = tqdm(
            total=total, initial=book.n_applied(), desc="editing", unit="edit", dynamic_ncols=True
        )
        self.failures = 0

    def close(self) -> None:
        """Close the progress bar (editing is over)."""
        self.bar.close()

    def collect(self, ref: Any) -> bool:
        """Take the result of the editor call ``ref``.

        Returns:
            True when it brought progress (worth a checkpoint), False when its editor died.

        Raises:
            JobError: more than ``max_failures`` editors died in this run.
        """
        import ray

        w, sids = self.editors.take(ref)
        try:
            progress = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            self._editor_died(w, sids, err)
            return False
        for p in progress:
            self.book.release(p.shard_id)
            self.bar.update(len(p.outcomes))
            stored = self.book.update(p.shard_id, p.memory, p.outcomes)
            self.observer.progress(p.outcomes, stored)
            if p.outcomes:
                last = p.outcomes[-1]
                self.bar.set_postfix(
                    shard=p.shard_id,
                    steps=last.steps,
                    act=f"{last.activation:.1f}/{last.threshold:.1f}",
                )
        return True

    def _editor_died(self, w: int, sids: list[int], err: Exception) -> None:
        self.failures += 1
        self.counters["actor_failures"] += 1
        logger.warning(
            "editor %d died (%s); retraining shards %s from their first edit on a new editor",
            w,
            type(err).__name__,
            sids,
        )
        if self.failures > self.max_failures:
            raise JobError(
                f"{self.failures} editor failures: giving up (runtime.max_actor_failures)"
            ) from err
        for sid in sids:
            self.bar.update(-self.book.reset(sid))
        self.editors.replace(w)
