"""Continuous retention measurement: every ``eval.every`` stored edits the job sends the latest merged state to
the evaluator actor and goes on editing; results are collected when they arrive, kept for the report and handed
to the metrics sink. At most one measurement is in flight: one that comes due meanwhile measures the newest
state once the evaluator is free.

Each measurement covers a seeded sample of all past edits (scope "all") and, with ``eval.recent``, the most
recent edits (scope "recent": the mean of their per-edit results; only those not already sampled are measured
again)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from orchestrator.config import EvalConfig
from orchestrator.telemetry.sinks import MetricsSink

logger = logging.getLogger(__name__)

# (tensors, meta, sampled past edits, fixed locality records, most recent edits) for a state of ``stored`` edits
EvalInputs = Callable[[int], tuple[dict, dict, list, list, list]]

#: Per-edit results averaged into a window's retention (``generate_*`` only when measured).
PER_EDIT_METRICS = (
    "reliability",
    "generalization",
    "locality",
    "generate_reliability",
    "generate_generalization",
)


def window_retention(per_edit: list[dict]) -> dict[str, Any]:
    """Retention of a window of edits: for each metric, the mean of the edits' own results (None if no edit has
    one), and ``edits``, the window's size."""
    out: dict[str, Any] = {"edits": len(per_edit)}
    for key in PER_EDIT_METRICS:
        values = [e[key] for e in per_edit if e.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


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
        self.pending: dict[Any, tuple[int, list[str]]] = {}  # object ref -> (stored edits, recent window ids)
        self.next_at = (stored // cfg.every + 1) * cfg.every if cfg.every else 0

    def maybe_submit(self, stored: int, inputs: EvalInputs) -> None:
        """Send a measurement if one is due and none is in flight."""
        every = self.cfg.every
        if not every or self.pending or stored < self.next_at:
            return
        self.next_at = (stored // every + 1) * every
        tensors, meta, sample, fixed, recent = inputs(stored)
        sampled = {r.id for r in sample}
        extra = [r for r in recent if r.id not in sampled]
        ref = self.evaluator.evaluate.remote(
            tensors, meta, sample, locality=fixed, generate=self.cfg.generate, recent=extra
        )
        self.pending[ref] = (stored, [r.id for r in recent])

    def collect(self, ref: Any) -> bool:
        """Record the measurement behind ``ref`` if it is one of ours (a failed one is logged, not fatal).

        Returns:
            True when ``ref`` was a measurement.
        """
        import ray

        measured = self.pending.pop(ref, None)
        if measured is None:
            return False
        stored, window = measured
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
        if window:
            per_edit = {e["id"]: e for e in [*post["per_edit"], *result.get("recent", [])]}
            entry["recent"] = window_retention([per_edit[i] for i in window])
        self.evaluations.append(entry)
        self.sink.record(entry)
        return True

    def drain(self, stored: int, inputs: EvalInputs) -> None:
        """At the end of editing: submit what is due, and wait for every measurement."""
        self.maybe_submit(stored, inputs)
        while self.pending:
            self.collect(next(iter(self.pending)))
            self.maybe_submit(stored, inputs)
