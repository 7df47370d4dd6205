"""Continuous retention measurement: every ``eval.every`` stored edits the job sends the latest merged state to
the evaluator actor and goes on editing; results are collected when they arrive, kept for the report and handed
to the metrics sink. At most one measurement is in flight: one that comes due meanwhile measures the newest
state once the evaluator is free."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from orchestrator.config import EvalConfig
from orchestrator.sink import MetricsSink

logger = logging.getLogger(__name__)

# (tensors, meta, sampled past edits, fixed locality records) for a state holding ``stored`` edits
EvalInputs = Callable[[int], tuple[dict, dict, list, list]]


class RetentionMonitor:
    """Schedules measurements on the evaluator actor and records their results.

    Args:
        evaluator: the evaluator actor handle.
        cfg: ``eval`` settings (``every``, ``generate``).
        sink: where each measurement goes.
        evaluations: the job's list of measurements (restored from a checkpoint), appended to in place.
        stored: edits stored when the job (re)starts: the first measurement is due at the next multiple.
    """

    def __init__(
        self, evaluator: Any, cfg: EvalConfig, sink: MetricsSink, evaluations: list[dict], stored: int
    ) -> None:
        self.evaluator = evaluator
        self.cfg = cfg
        self.sink = sink
        self.evaluations = evaluations
        self.pending: dict[Any, int] = {}  # object ref -> stored edits it measures
        self.next_at = (stored // cfg.every + 1) * cfg.every if cfg.every else 0

    def maybe_submit(self, stored: int, inputs: EvalInputs) -> None:
        """Send a measurement if one is due and none is in flight."""
        every = self.cfg.every
        if not every or self.pending or stored < self.next_at:
            return
        self.next_at = (stored // every + 1) * every
        tensors, meta, sample, fixed = inputs(stored)
        ref = self.evaluator.evaluate.remote(
            tensors, meta, sample, locality=fixed, generate=self.cfg.generate
        )
        self.pending[ref] = stored

    def collect(self, ref: Any) -> bool:
        """Record the measurement behind ``ref`` if it is one of ours (a failed one is logged, not fatal).

        Returns:
            True when ``ref`` was a measurement.
        """
        import ray

        stored = self.pending.pop(ref, None)
        if stored is None:
            return False
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as err:
            logger.warning("retention measurement at %d edits failed: %s", stored, err)
            return True
        post = result["post"]
        entry = {
            "edits": stored,
            "time": time.time(),
            "sampled": result["evaluated"],
            **post["teacher_forced"],
            **{f"generate_{k}": v for k, v in (post.get("generate") or {}).items()},
            "locality_fixed": result.get("locality_fixed"),
            "seconds": result["seconds"],
        }
        self.evaluations.append(entry)
        self.sink.record(entry)
        return True

    def drain(self, stored: int, inputs: EvalInputs) -> None:
        """At the end of editing: submit what is due, and wait for every measurement."""
        self.maybe_submit(stored, inputs)
        while self.pending:
            self.collect(next(iter(self.pending)))
            self.maybe_submit(stored, inputs)
