"""The job's Prometheus metrics, fed from the driver.

Editor and evaluator actors report their progress to the driver (finished edits, shards, measurements), so
the driver exports the editing metrics for the whole job from one ``/metrics`` endpoint: actors export nothing
themselves, and Prometheus needs no address of theirs. Ray's own system metrics (actor states, object store,
CPU/GPU per node) come from Ray's metrics export port on each node (docs/metrics.md). Names live in
:mod:`orchestrator.telemetry.metrics`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from orchestrator.config import ConfigError, JobConfig
from orchestrator.scheduler import ShardBook
from orchestrator.telemetry.metrics import JobMetrics
from orchestrator.telemetry.monitor import window_retention
from streams import EditRecord
from wise.memory import Memory, MemoryBank
from wise.trainer import EditOutcome

logger = logging.getLogger(__name__)


def _memory_bytes(m: Memory) -> int:
    return m.delta.numel() * m.delta.element_size() + sum(k.numel() * k.element_size() for k in m.keys)


def _removed(bank: MemoryBank) -> dict[str, int]:
    """The bank's superseded and retracted edits, as counter totals."""
    return {"edits_superseded": len(bank.superseded), "edits_retracted": len(bank.retracted)}


def stream_name(cfg: JobConfig, python_records: bool) -> str:
    """A short description of the job's edit stream (``job_info``)."""
    if cfg.stream.kind == "kafka":
        return f"kafka:{cfg.stream.topic}"
    return "python-iterable" if python_records else str(cfg.stream.path)


class JobObserver:
    """Feeds the job's state into its :class:`~orchestrator.telemetry.metrics.JobMetrics` and serves it.

    Args:
        cfg: the job configuration (``metrics``, ``eval.recent``, ``model.name``).
        ray_job_id: the driver's Ray job id.
        python_records: the edits come from a Python iterable.
    """

    def __init__(self, cfg: JobConfig, ray_job_id: str, python_records: bool = False) -> None:
        self.cfg = cfg
        self.metrics = JobMetrics(ray_job_id, cfg.model.name, stream_name(cfg, python_records))
        self.address: str | None = None
        self._applied: list[str] = []  # applied since the last checkpoint

    def start(self, book: ShardBook, counters: Mapping[str, int]) -> str | None:
        """Continue a resumed job's totals, time merges, and serve ``/metrics`` if ``metrics.port`` is set.

        Returns:
            ``http://host:port/metrics``, or None when metrics are off.

        Raises:
            ConfigError: the port cannot be bound (in use, no permission).
        """
        self.metrics.totals({**counters, **_removed(book.bank)})
        self.metrics.edits_applied((), book.n_applied())
        book.on_merge = self.metrics.merge_done
        mc = self.cfg.metrics
        if mc.port is None:
            return None
        try:
            host, port = self.metrics.serve(mc.host, mc.port)
        except OSError as err:
            raise ConfigError(
                f"metrics.port: cannot serve metrics on {mc.host}:{mc.port}: {err} "
                "(metrics.port=0 picks a free port; null turns metrics off)"
            ) from None
        self.address = f"http://{host}:{port}/metrics"
        logger.info("Prometheus metrics at %s", self.address)
        return self.address

    def read(self, counters: Mapping[str, int], accepted: Sequence[EditRecord]) -> None:
        """After reading the stream: counters, and the arrival time of each accepted edit."""
        self.metrics.totals(counters)
        now = time.time()
        for rec in accepted:
            self.metrics.edit_accepted(rec.id, now)

    def progress(self, outcomes: Iterable[EditOutcome], stored: Sequence[int]) -> None:
        """An editor reported edits (applied once the next checkpoint commits) and shards stored in the bank."""
        self._applied.extend(o.edit_id for o in outcomes)
        if stored:
            self.metrics.shards_stored(len(stored))

    def checkpoint(
        self, state: Mapping[str, Any], book: ShardBook, bank: MemoryBank, counters: Mapping[str, int]
    ) -> None:
        """A checkpoint holding ``state`` is committed: what it holds is applied."""
        m = self.metrics
        applied = book.n_applied()
        m.edits_applied(self._applied, applied, at=state["time"])
        self._applied = []
        m.totals({**counters, **_removed(bank)})
        m.checkpoint_committed(state["time"])
        m.stream_position(state)
        m.pending(len(book.records) - applied)
        training = [t.progress for t in book.tasks.values() if t.progress is not None]
        nbytes = sum(_memory_bytes(x) for x in [*bank.memories(), *training])
        m.side_memories(len(bank.merged), len(bank.pending), len(training), nbytes)

    def final(self, report: Mapping[str, Any], applied_ids: Sequence[str]) -> None:
        """The final measurement: retention over all edits as in the report, and over the most recent ones."""
        generate = {f"generate_{k}": v for k, v in (report.get("retention_generate") or {}).items()}
        n = report["edits_applied"]
        self.metrics.retention("all", {**report["retention"], **generate}, n)
        window = set(applied_ids[-self.cfg.eval.recent :]) if self.cfg.eval.recent else set()
        per_edit = [e for e in report["per_edit"] if e["id"] in window]
        if per_edit:
            self.metrics.retention("recent", window_retention(per_edit), n)

    def close(self, linger: bool) -> None:
        """Stop serving, after ``metrics.linger_s`` when ``linger`` (the job finished: one last scrape)."""
        if linger and self.address and self.cfg.metrics.linger_s:
            logger.info("serving final metrics for %.0f s (metrics.linger_s)", self.cfg.metrics.linger_s)
            time.sleep(self.cfg.metrics.linger_s)
        self.metrics.close()
