"""The editing job on Ray: a stream of edits in, a WISE-edited state and a retention report out.

Lifecycle (torchtune-recipe style): ``setup()`` joins or starts Ray, restores the checkpoint if there is one,
opens the stream and starts the actors; ``run()`` reads the stream only as fast as the editors consume it,
hands out shards in stream order, stores finished shards in order (merging on cadence), checkpoints after
every editor report, measures retention continuously on the evaluator, and finally writes the state and the
report; ``cleanup()`` stops the actors (and the local Ray instance it started).

The parts: :mod:`~orchestrator.resume` (checkpoint state, restoring it), :mod:`~orchestrator.intake` (reading
the stream), :mod:`~orchestrator.dispatch` (shards to editors), :mod:`~orchestrator.collect` (their results),
:mod:`~orchestrator.report` (the report).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.replica import ModelSpec
from orchestrator import cluster
from orchestrator.checkpoint import CheckpointStore
from orchestrator.collect import ResultCollector
from orchestrator.config import JobConfig
from orchestrator.dispatch import EditorPool
from orchestrator.errors import JobError
from orchestrator.inputs import EditInput, irrelevant_pool, open_input
from orchestrator.intake import Intake
from orchestrator.measure import StateView
from orchestrator.model_store import resolve_model_path
from orchestrator.report import build_report, memory_cost, write_report
from orchestrator.resume import checkpoint_state, job_identity, restore
from orchestrator.retract import Retractions
from orchestrator.scheduler import ShardBook
from orchestrator.telemetry.metrics import JobMetrics
from orchestrator.telemetry.monitor import RetentionMonitor
from orchestrator.telemetry.observer import JobObserver
from orchestrator.telemetry.sinks import FanoutSink, MetricsSink, default_sink
from wise.batch import Tokens
from wise.factory import make_bank
from wise.memory import Memory
from wise.state import write_state

if TYPE_CHECKING:
    from orchestrator.publish import Publisher  # setup() imports it only when serving is on

__all__ = ["EditJob", "JobError", "run_job"]

logger = logging.getLogger(__name__)


def _model(cfg: JobConfig) -> tuple[ModelSpec, Any]:
    """The replica every actor loads, and its tokenizer (the driver needs only that)."""
    from transformers import AutoTokenizer

    path = str(resolve_model_path(cfg.model.name))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise JobError(f"model.name={cfg.model.name!r}: no tokenizer at {path}: {err}") from err
    return ModelSpec(path, cfg.model.dtype, cfg.model.device), tokenizer


class EditJob:
    """One run of the editing job (a resumed run continues the checkpoint in ``checkpoint.dir``).

    Args:
        cfg: the job configuration.
        records: optional iterable of edit records (dicts, JSON strings or ``EditRecord``) used instead of
            ``stream.path``; a resumed run skips the positions already consumed.
            With ``stream.kind: kafka`` the job reads the topic instead; without ``max_edits`` it keeps
            consuming until SIGTERM (checkpoint, commit offsets, report, exit 0).
        sink: where continuous retention measurements go (default: log + ``<output.dir>/metrics.jsonl``); they
            also go to the job's Prometheus metrics, ``self.metrics`` (served on ``metrics.port`` while it runs).
    """

    def __init__(
        self, cfg: JobConfig, records: Iterable[Any] | None = None, sink: MetricsSink | None = None
    ) -> None:
        if cfg.stream.kind == "file" and records is None and cfg.stream.path is None:
            raise JobError("no edits: set stream.path or pass records=")
        if cfg.stream.kind == "kafka" and records is not None:
            raise JobError("records= is for stream.kind=file; a kafka job reads stream.topic")
        self.cfg = cfg
        self._records = records
        self.sink = sink
        self.report: dict[str, Any] | None = None
        self.editors = EditorPool(cfg.runtime, cfg.wise, cfg.checkpoint.every)
        self.evaluator: Any = None
        self.publisher: Publisher | None = None  # publishes to the vLLM serving pool (publish.replicas > 0)
        self.metrics: JobMetrics | None = None  # the serving layer reports publishes there too
        # what setup() restores (empty for a fresh job)
        self.bank = make_bank(cfg.wise)
        self.book = ShardBook(cfg.wise.save_freq, self.bank)
        self.counters: dict[str, int] = {}
        self.retractions = Retractions()
        self.evaluations: list[dict] = []
        self.resumed_from: dict[str, Any] | None = None
        self._published_version = 0
        # what setup() opens or starts
        self.store: CheckpointStore | None = None
        self.input: EditInput | None = None
        self.intake: Intake | None = None
        self.observer: JobObserver | None = None
        self.setup_state: dict | None = None  # the editors' templates and margins
        self.model_bytes = 0  # the model's parameter bytes (the unit of the report's memory cost)
        self.view: StateView | None = None  # the editor state, as the evaluator measures it
        self._started_ray = False
        self._stopping = False

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Join/start Ray, restore the checkpoint, open the stream, start the actors."""
        cfg = self.cfg
        model, tokenizer = _model(cfg)
        irrelevant = irrelevant_pool(cfg)
        if cfg.wise.layout == "shards" and cfg.wise.margins.scale == "auto" and not irrelevant:
            raise JobError(
                "wise.margins.scale=auto needs an irrelevant pool (irrelevant.path) to measure the scale"
            )
        Path(cfg.output.dir).mkdir(parents=True, exist_ok=True)
        self.sink = self.sink or default_sink(Path(cfg.output.dir) / "metrics.jsonl")

        self.store = CheckpointStore(cfg.checkpoint_dir(), job_identity(cfg, self._records is not None))
        restored = restore(self.store, cfg)
        self.bank, self.book = restored.bank, restored.book
        self.counters, self.evaluations = restored.counters, restored.evaluations
        self.setup_state, self.resumed_from = restored.setup, restored.resumed_from
        self._published_version = restored.published_version
        self.retractions = Retractions(restored.retractions)
        # before Ray: a missing file or an unreachable broker fails fast (a consumer that then waits long for
        # the editors without polling leaves its group and rejoins on its first poll; nothing is lost)
        self.input = open_input(cfg, self._records, restored.position)

        self._started_ray = cluster.connect(cfg.runtime)
        import ray

        self.observer = JobObserver(cfg, ray.get_runtime_context().get_job_id(), self._records is not None)
        self.metrics = self.observer.metrics
        self.sink = FanoutSink(self.sink, self.metrics)
        self.observer.start(self.book, self.counters)
        info = self.editors.start(model, irrelevant, self.setup_state)
        self.setup_state = setup = self.editors.setup
        assert setup is not None
        weight = (tuple(info["weight_shape"]), info["module_path"], info["dtype"])
        self.model_bytes = int(info["model_bytes"])
        self.view = StateView(cfg, self.book, self.bank, setup, weight)
        self.evaluator = cluster.evaluator_actor(cfg.runtime, model, cfg.wise)
        self.editors.wait_ready()  # every editor is loaded before the clock starts
        self.intake = Intake(
            cfg,
            self.input,
            self.book,
            self.store,
            self.observer,
            self.sink,
            Tokens(tokenizer, cfg.wise.max_prompt_tokens),
            setup["templates"],
            self.counters,
            restored.seen_ids,
            stopping=self.stopping,
            retractions=self.retractions,
        )
        if cfg.publish.replicas:
            from orchestrator.publish import Publisher

            version, module_path = self._published_version, info["module_path"]
            self.publisher = Publisher(
                cfg.publish, cfg.model.name, cfg.wise, module_path, self.metrics, version, setup
            )
            self.publisher.start(self.bank.memories())

    # ------------------------------------------------------------------ checkpoint
    def _checkpoint(self, final: bool = False) -> None:
        """Apply the retractions that are due, commit a checkpoint, then acknowledge its read position to the
        input (Kafka offsets). ``final``: the stream has ended (:meth:`Retractions.apply`)."""
        store, inp, observer, intake = self.store, self.input, self.observer, self.intake
        assert store is not None and inp is not None and observer is not None and intake is not None
        self.retractions.apply(self.book, self.bank, final)
        position = inp.checkpoint_state()
        version = self.publisher.version if self.publisher else self._published_version
        state = checkpoint_state(
            store,
            position,
            self.book,
            self.bank,
            self.setup_state,
            self.counters,
            self.evaluations,
            version,
            self.retractions.state(),
        )
        store.commit(state)
        inp.after_commit(position)
        observer.checkpoint(state, self.book, self.bank, self.counters)
        intake.record_lag()
        if self.publisher is not None:  # after the commit: a served version is always a checkpointed one
            self.publisher.maybe_publish(self.bank.memories(), self.book.merges, self.retractions.applied)

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict[str, Any]:
        """Apply the stream on the editors, evaluate retention, save the state, and write the report.

        Returns:
            The report (also written to ``output.report``).

        Raises:
            JobError: editors keep dying (more than ``runtime.max_actor_failures``).
            KafkaStreamError: the broker stayed unreachable for ``stream.connect_timeout_s`` (the checkpoint
                is intact: the same command resumes).
        """
        if not self.editors:
            self.setup()
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self._run()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def stopping(self) -> bool:
        """Whether the job got SIGTERM: it reads no more, finishes the editor calls in flight and reports."""
        return self._stopping

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        logger.warning("SIGTERM: stop reading, finish the editor calls in flight, checkpoint and exit")
        self._stopping = True

    def _run(self) -> dict[str, Any]:
        intake, inp, observer, view, sink = self.intake, self.input, self.observer, self.view, self.sink
        assert intake is not None and inp is not None and observer is not None and view is not None
        assert sink is not None
        cfg = self.cfg
        start = time.perf_counter()
        applied_at_start = self.book.n_applied()
        results = ResultCollector(
            self.editors, self.book, observer, self.counters, cfg.runtime.max_actor_failures, cfg.max_edits
        )
        monitor = RetentionMonitor(self.evaluator, cfg.eval, sink, self.evaluations, self.bank.n_edits())
        self._checkpoint()
        while True:
            intake.read()
            if self.retractions.due(self.book):  # its edits are stored already: no editor report will follow
                self._checkpoint()
            intake.record_lag()  # at most every LAG_EVERY_S: an idle consumer reports its lag too
            # a caught-up Kafka stream trains its partial last shard rather than wait for a full one
            self.editors.dispatch(self.book, self.bank, intake.stream_done or inp.caught_up, self.stopping)
            if not self.editors.inflight:
                if self._stopping or (intake.stream_done and not self.book.ready(True)):
                    break
                continue
            # a Kafka consumer must poll regularly while the editors are busy to stay in its group
            for ref in self.editors.wait(monitor.pending, inp.heartbeat_s):
                if monitor.collect(ref):
                    # one that came due meanwhile measures the latest state
                    monitor.maybe_submit(self.bank.n_edits(), view.eval_inputs)
                elif results.collect(ref):
                    self._checkpoint()
                    monitor.maybe_submit(self.bank.n_edits(), view.eval_inputs)
        results.close()
        edit_seconds = time.perf_counter() - start
        monitor.drain(self.bank.n_edits(), view.eval_inputs)
        self._checkpoint(final=intake.stream_done and self.book.settled())
        intake.record_lag(force=True)
        return self._finish(start, edit_seconds, self.book.n_applied() - applied_at_start)

    # ------------------------------------------------------------------ the end
    def _finish(self, start: float, edit_seconds: float, applied_now: int) -> dict[str, Any]:
        import ray

        cfg, observer, view = self.cfg, self.observer, self.view
        assert observer is not None and view is not None
        tensors, meta = view.state(include_active=True)
        state_dir = write_state(Path(cfg.output.dir) / "state", tensors, meta)
        if self.publisher is not None:
            self.publisher.publish_final(
                [*self.bank.memories(), Memory.from_state(tensors, "active", meta["active"])]
            )
        ids, evaluated, result = view.measure_final(self.evaluator, tensors, meta)
        dead_letter = self.input.dead_letter_target if self.input and self.counters["dead_lettered"] else None
        self.report = build_report(
            cfg,
            counters=self.counters,
            applied=ids,
            accepted=[r.id for r in self.book.records],
            unstored=[r.id for r in self.book.open_records()],
            retractions_pending=[p.id for p in self.retractions.pending],
            stopped=self._stopping,
            resumed_from=self.resumed_from,
            evaluated=evaluated,
            result=result,
            meta=meta,
            runtime={
                "checkpoints": self.store.commits if self.store else 0,
                "local_ray": self._started_ray,
                "ray_address": ray.get_runtime_context().gcs_address,
                "metrics_url": observer.address,
            },
            evaluations=self.evaluations,
            applied_now=applied_now,
            edit_seconds=edit_seconds,
            wall_seconds=time.perf_counter() - start,
            state_dir=state_dir,
            dead_letter=dead_letter,
            serving=self.publisher.summary() if self.publisher else None,
            memory=memory_cost(tensors, meta, self.model_bytes),
        )
        write_report(self.report, cfg.report_path())
        observer.final(self.report, ids)
        return self.report

    def cleanup(self) -> None:
        """Stop the actors, close files, and shut down a Ray instance this job started (idempotent)."""
        if self.publisher is not None:
            self.publisher.stop(linger=self.report is not None)
            self.publisher = None
        if self.input is not None:
            self.input.close()
        if self.store is not None:
            self.store.close()
        self.editors.kill()
        if self.evaluator is not None:
            import ray

            ray.kill(self.evaluator)
            self.evaluator = None
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False
        if self.observer is not None:  # last: a lingering exporter holds no actors
            self.observer.close(linger=self.report is not None)
            self.observer = None


def run_job(cfg: JobConfig, records: Iterable[Any] | None = None, sink: MetricsSink | None = None) -> dict:
    """Run a whole job (setup, run, cleanup) and return its report."""
    job = EditJob(cfg, records=records, sink=sink)
    try:
        job.setup()
        return job.run()
    finally:
        job.cleanup()
