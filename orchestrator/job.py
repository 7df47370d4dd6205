"""The editing job on Ray: a stream of edits in, a WISE-edited state and a retention report out.

Lifecycle (torchtune-recipe style): ``setup()`` joins or starts Ray, restores the checkpoint if there is one,
opens the stream and starts the actors; ``run()`` reads the stream only as fast as the editors consume it,
hands out shards in stream order, stores finished shards in order (merging on cadence), checkpoints after
every editor report, measures retention continuously on the evaluator, and finally writes the state and the
report; ``cleanup()`` stops the actors (and the local Ray instance it started).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from actors.editor import Edit, ShardSpec
from actors.replica import ModelSpec
from orchestrator import cluster
from orchestrator.checkpoint import CheckpointStore
from orchestrator.config import JobConfig
from orchestrator.errors import JobError
from orchestrator.inputs import EditInput, irrelevant_pool, open_input
from orchestrator.model_store import resolve_model_path
from orchestrator.report import retention_fields, write_report
from orchestrator.scheduler import ShardBook
from orchestrator.telemetry.monitor import RetentionMonitor
from orchestrator.telemetry.observer import JobObserver
from orchestrator.telemetry.sinks import FanoutSink, MetricsSink, default_sink
from streams import EditRecord
from wise.batch import PromptTooLongError, Tokens
from wise.editor import compose_state
from wise.memory import Memory, MemoryBank
from wise.state import write_state
from wise.trainer import check_edit

__all__ = ["EditJob", "JobError", "run_job", "spread"]

logger = logging.getLogger(__name__)


def _edit(rec: EditRecord) -> Edit:
    return Edit(rec.id, rec.prompt, rec.target)


def spread(items: list, n: int | None) -> list:
    """At most ``n`` items evenly spread over ``items`` (first, last and between), all when ``n`` is None."""
    if n is None or len(items) <= n:
        return list(items)
    if n == 1:
        return [items[-1]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


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
        self._started_ray = False
        self.editors: list[Any] = []
        self.evaluator: Any = None
        self.store: CheckpointStore | None = None
        self.input: EditInput | None = None
        self.observer: JobObserver | None = None
        self.metrics: Any = None  # its JobMetrics once set up: the serving layer reports publishes there
        self.publisher: Any = None  # the vLLM serving pool it publishes to (publish.replicas > 0)
        self._published_version = 0
        self.merges = 0
        self._stopping = False

    # ------------------------------------------------------------------ setup
    def _job_identity(self, model_path: str) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.stream.kind == "kafka":  # not the bootstrap address: the same topic may move
            stream: Any = {"kind": "kafka", "topic": cfg.stream.topic, "group": cfg.stream.group}
        else:
            stream = cfg.stream.path if self._records is None else "<python iterable>"
        return {
            "stream": stream,
            "model": cfg.model.name,
            "dtype": cfg.model.dtype,
            "wise": cfg.wise.model_dump(mode="json"),
            "irrelevant": cfg.irrelevant.model_dump(mode="json"),
        }

    def setup(self) -> None:
        """Join/start Ray, restore the checkpoint, open the stream, start the actors."""
        from transformers import AutoTokenizer

        cfg = self.cfg
        path = str(resolve_model_path(cfg.model.name))
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as err:
            raise JobError(f"model.name={cfg.model.name!r}: no tokenizer at {path}: {err}") from err
        self.tokens = Tokens(tokenizer, cfg.wise.max_prompt_tokens)
        self.model = ModelSpec(path, cfg.model.dtype, cfg.model.device)
        self.pool = irrelevant_pool(cfg)
        if cfg.wise.margins.scale == "auto" and not self.pool:
            raise JobError(
                "wise.margins.scale=auto needs an irrelevant pool (irrelevant.path) to measure the scale"
            )
        Path(cfg.output.dir).mkdir(parents=True, exist_ok=True)
        self.sink = self.sink or default_sink(Path(cfg.output.dir) / "metrics.jsonl")

        self.store = CheckpointStore(cfg.checkpoint_dir(), self._job_identity(path))
        ckpt = self.store.load()
        self.bank = MemoryBank(cfg.wise)
        self.counters = {"duplicates_skipped": 0, "dead_lettered": 0, "edits_seen": 0, "actor_failures": 0}
        self.evaluations: list[dict] = []
        self.setup_state: dict | None = None
        self.resumed_from: dict | None = None
        journal = self.store.open_journal(ckpt["accepted"] if ckpt else 0)
        records = [EditRecord.model_validate(r) for r in journal]
        position = 0
        if ckpt is None:
            self.book = ShardBook(cfg.wise.save_freq, self.bank)
        else:
            self.bank.pending = [self.store.read_memory(n) for n in ckpt["bank"]["pending"]]
            self.bank.merged = [self.store.read_memory(n) for n in ckpt["bank"]["merged"]]
            first = ckpt["next_store"]
            self.book = ShardBook(cfg.wise.save_freq, self.bank, first_shard=first)
            self.setup_state = ckpt["setup"]
            self.counters.update(ckpt["counters"])
            self._published_version = ckpt.get("published_version", 0)
            self.evaluations = ckpt.get("evaluations", [])
            position = ckpt.get("position", 0)
        stored_records = self.book.next_store * cfg.wise.save_freq
        self.book.records = records[:stored_records]
        for rec in records[stored_records:]:
            self.book.add(rec)
        if ckpt is not None:
            for s in ckpt["shards"]:
                self.book.tasks[s["shard_id"]].progress = self.store.read_memory(s["memory"])
            self.resumed_from = {
                "position": position if cfg.stream.kind == "file" else ckpt.get("offsets"),
                "records": len(records),
                "edits_applied": self.book.n_applied(),
                "committed_at": ckpt["time"],
            }
            logger.info(
                "resuming from %s: %d records accepted, %d applied, stream position %d",
                self.store.dir,
                len(records),
                self.book.n_applied(),
                position,
            )
        self.seen_ids = {r.id for r in records}

        remaining = None if cfg.max_edits is None else cfg.max_edits - len(records)
        self._remaining = remaining
        self._stream_done = remaining is not None and remaining <= 0
        # before Ray: a missing file or an unreachable broker fails fast (a consumer that then waits long for
        # the editors without polling leaves its group and rejoins on its first poll; nothing is lost)
        self.input = open_input(cfg, self._records, position)

        self._started_ray = cluster.connect(cfg.runtime)
        import ray

        self.observer = JobObserver(cfg, ray.get_runtime_context().get_job_id(), self._records is not None)
        self.metrics = self.observer.metrics
        self.sink = FanoutSink(self.sink, self.metrics)
        self.observer.start(self.book, self.counters)
        first_editor = cluster.editor_actor(cfg.runtime, self.model, cfg.wise, self.pool, self.setup_state)
        try:
            info = ray.get(first_editor.info.remote())
        except ray.exceptions.RayActorError as err:
            raise JobError(f"the first editor could not start: {err}") from err
        self.setup_state = self.setup_state or info["setup"]
        self._weight = (tuple(info["weight_shape"]), info["module_path"], info["dtype"])
        self.editors = [first_editor] + [
            cluster.editor_actor(cfg.runtime, self.model, cfg.wise, self.pool, self.setup_state)
            for _ in range(cfg.runtime.editors - 1)
        ]
        self.evaluator = cluster.evaluator_actor(cfg.runtime, self.model, cfg.wise)
        try:  # every editor is loaded before the clock starts
            ray.get([e.info.remote() for e in self.editors[1:]])
        except ray.exceptions.RayActorError as err:
            raise JobError(f"an editor could not start: {err}") from err
        timed_merge = self.book.on_merge

        def on_merge(seconds: float) -> None:
            self.merges += 1
            if timed_merge is not None:
                timed_merge(seconds)

        self.book.on_merge = on_merge
        if cfg.publish.replicas:
            from orchestrator.publish import Publisher

            self.publisher = Publisher(
                cfg.publish,
                cfg.model.name,
                cfg.wise,
                info["module_path"],
                self.metrics,
                self._published_version,
            )
            self.publisher.start()
            if self.bank.memories():  # a resumed job serves what it had stored at once
                self.publisher.publish(self.bank.memories())

    # ------------------------------------------------------------------ stream
    def _reject(self, position: Any, rec: EditRecord, reason: str) -> None:
        logger.warning("edit %s at position %s rejected: %s", rec.id, position, reason)
        assert self.input is not None
        self.input.reject(position, rec, reason)
        self.counters["dead_lettered"] += 1

    def _read(self) -> None:
        """Read records until the editors have enough queued work (backpressure) or the stream ends (a
        Kafka stream: until it is caught up; it waits for new edits only while no editor is busy)."""
        cfg = self.cfg
        inp = self.input
        assert inp is not None
        capacity = cfg.runtime.editors * cfg.runtime.shards_per_editor
        rejected_before = inp.rejected
        new: list[EditRecord] = []
        wait = not self.book.in_flight() and not self.book.ready(True)
        while not self._stream_done and not self._stopping:
            if self.book.open_shards() >= capacity:
                inp.hold()
                break
            got = inp.next(wait)
            if got is None:
                self._stream_done = inp.exhausted
                break
            position, rec = got
            wait = False  # at most one blocking wait per call
            self.counters["edits_seen"] += 1
            if rec.id in self.seen_ids:
                logger.info("edit %s at position %s is already applied: skipped", rec.id, position)
                self.counters["duplicates_skipped"] += 1
                continue
            try:
                check_edit(self.tokens, self.setup_state["templates"], rec)
            except PromptTooLongError as err:
                self._reject(position, rec, str(err))
                continue
            self.seen_ids.add(rec.id)
            self.book.add(rec)
            new.append(rec)
            if self._remaining is not None and len(self.book.records) >= self.cfg.max_edits:
                self._stream_done = True  # stop before reading the next record: it stays unread
        self.counters["edits_seen"] += inp.rejected - rejected_before
        self.counters["dead_lettered"] += inp.rejected - rejected_before
        self.observer.read(self.counters, new)
        if new:
            assert self.store is not None
            self.store.append(r.model_dump(mode="json") for r in new)

    # ------------------------------------------------------------------ checkpoint
    def _checkpoint(self) -> None:
        """Commit a checkpoint, then acknowledge its read position to the input (Kafka offsets)."""
        store, inp = self.store, self.input
        assert store is not None and inp is not None
        position = inp.checkpoint_state()
        shards = []
        for sid in sorted(self.book.tasks):
            t = self.book.tasks[sid]
            if t.progress is not None and t.applied:
                shards.append({"shard_id": sid, "memory": store.write_memory(t.progress, "shard")})
        state = {
            "time": time.time(),
            **position,
            "accepted": len(self.book.records),
            "next_store": self.book.next_store,
            "setup": self.setup_state,
            "bank": {
                "pending": [store.write_memory(m, "pending") for m in self.bank.pending],
                "merged": [store.write_memory(m, "merged") for m in self.bank.merged],
            },
            "shards": shards,
            "counters": self.counters,
            "evaluations": self.evaluations,
            "published_version": self.publisher.version if self.publisher else self._published_version,
        }
        store.commit(state)
        inp.after_commit(position)
        self.observer.checkpoint(state, self.book, self.bank, self.counters)
        self._record_lag()
        if self.publisher is not None:  # after the commit: a served version is always a checkpointed one
            self.publisher.maybe_publish(self.bank.memories(), self.merges)

    def _record_lag(self, force: bool = False) -> None:
        """Hand consumer lag per partition (messages not yet checkpointed) to the metrics sink."""
        assert self.input is not None and self.sink is not None
        lag = self.input.lag(force)
        if lag is not None:
            entry = {"kind": "lag", "edits": self.book.n_applied(), "time": time.time(), "lag": lag}
            self.sink.record({**entry, "lag_total": sum(lag.values())})

    # ------------------------------------------------------------------ evaluation
    def _state(self, include_active: bool) -> tuple[dict, dict]:
        """The editor state of everything stored (plus, at the end, the partial last shard)."""
        shape, module_path, dtype = self._weight
        active = self.book.active() if include_active else None
        if active is None:
            active = Memory(torch.zeros(shape, dtype=getattr(torch, dtype)), shard_ids=[self.book.next_store])
        return compose_state(self.cfg.wise, module_path, shape, self.setup_state or {}, self.bank, active)

    def _eval_inputs(self, stored: int) -> tuple[dict, dict, list, list, list]:
        """What a continuous measurement needs: the stored state, a seeded sample of its edits, the fixed
        locality set (the locality pairs of the stream's first records), and its ``eval.recent`` latest edits."""
        by_id = {r.id: r for r in self.book.records}
        ids = self.bank.edit_ids()
        sample = [by_id[i] for i in random.Random(stored).sample(ids, min(self.cfg.eval.sample, len(ids)))]
        recent = [by_id[i] for i in ids[-self.cfg.eval.recent :]] if self.cfg.eval.recent else []
        tensors, meta = self._state(include_active=False)
        return tensors, meta, sample, self.book.records[: self.cfg.eval.locality_set], recent

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

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        logger.warning("SIGTERM: stop reading, finish the editor calls in flight, checkpoint and exit")
        self._stopping = True

    def _run(self) -> dict[str, Any]:
        import ray

        assert self.input is not None
        cfg = self.cfg
        start = time.perf_counter()
        applied_at_start = self.book.n_applied()
        bar = tqdm(
            total=cfg.max_edits, initial=applied_at_start, desc="editing", unit="edit", dynamic_ncols=True
        )
        inflight: dict[Any, tuple[int, list[int]]] = {}
        assert self.sink is not None
        monitor = RetentionMonitor(self.evaluator, cfg.eval, self.sink, self.evaluations, self.bank.n_edits())
        failures = 0
        self._checkpoint()
        while True:
            self._read()
            self._record_lag()  # at most every LAG_EVERY_S: an idle consumer reports its lag too
            busy = {w for w, _ in inflight.values()}
            for w, editor in enumerate(self.editors):
                if w in busy:
                    continue
                if self._stopping:
                    break
                # an editor continues its own shards first: they are cached in it; a caught-up Kafka
                # stream trains its partial last shard rather than wait for a full one
                ready = self.book.ready(self._stream_done or self.input.caught_up)
                ready.sort(key=lambda t: (t.last_worker != w, t.shard_id))
                group = ready[: cfg.runtime.shards_per_editor]
                if not group:
                    break
                base = self.bank.base()
                base = None if base is None else base.detach().cpu()  # one copy for the group's fresh shards
                specs = [
                    ShardSpec(
                        t.shard_id,
                        t.start,
                        tuple(_edit(r) for r in t.records),
                        t.progress,
                        None if t.progress is not None else base,
                    )
                    for t in group
                ]
                for t in group:
                    t.worker = t.last_worker = w
                inflight[editor.train.remote(specs, cfg.checkpoint.every)] = (w, [t.shard_id for t in group])
            if not inflight:
                if self._stopping or (self._stream_done and not self.book.ready(True)):
                    break
                continue
            # a Kafka consumer must poll regularly while the editors are busy to stay in its group
            done, _ = ray.wait([*inflight, *monitor.pending], num_returns=1, timeout=self.input.heartbeat_s)
            for ref in done:
                if monitor.collect(ref):
                    # one that came due meanwhile measures the latest state
                    monitor.maybe_submit(self.bank.n_edits(), self._eval_inputs)
                    continue
                w, sids = inflight.pop(ref)
                try:
                    progress = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    failures += 1
                    self.counters["actor_failures"] += 1
                    logger.warning(
                        "editor %d died (%s); retraining shards %s from their first edit on a new editor",
                        w,
                        type(err).__name__,
                        sids,
                    )
                    if failures > cfg.runtime.max_actor_failures:
                        raise JobError(
                            f"{failures} editor failures: giving up (runtime.max_actor_failures)"
                        ) from err
                    for sid in sids:
                        bar.update(-self.book.tasks[sid].applied)
                        self.book.reset(sid)
                    self.editors[w] = cluster.editor_actor(
                        cfg.runtime, self.model, cfg.wise, self.pool, self.setup_state
                    )
                    continue
                for p in progress:
                    self.book.tasks[p.shard_id].worker = None
                    bar.update(len(p.outcomes))
                    stored = self.book.update(p.shard_id, p.memory, p.outcomes)
                    self.observer.progress(p.outcomes, stored)
                    if p.outcomes:
                        last = p.outcomes[-1]
                        bar.set_postfix(
                            shard=p.shard_id,
                            steps=last.steps,
                            act=f"{last.activation:.1f}/{last.threshold:.1f}",
                        )
                self._checkpoint()
                monitor.maybe_submit(self.bank.n_edits(), self._eval_inputs)
        bar.close()
        edit_seconds = time.perf_counter() - start
        monitor.drain(self.bank.n_edits(), self._eval_inputs)
        self._checkpoint()
        self._record_lag(force=True)
        return self._finish(start, edit_seconds, self.book.n_applied() - applied_at_start)

    # ------------------------------------------------------------------ the end
    def _finish(self, start: float, edit_seconds: float, applied_now: int) -> dict[str, Any]:
        import ray

        cfg = self.cfg
        tensors, meta = self._state(include_active=True)
        state_dir = write_state(Path(cfg.output.dir) / "state", tensors, meta)
        if self.publisher is not None:  # the final state, partial last shard included
            final = [*self.bank.memories(), Memory.from_state(tensors, "active", meta["active"])]
            if sum(len(m.edit_ids) for m in final) != self.publisher.published_edits:
                self.publisher.publish(final)
        ids = [*self.bank.edit_ids(), *meta["active"]["edit_ids"]]
        accepted = [r.id for r in self.book.records]
        by_id = {r.id: r for r in self.book.records}
        # after SIGTERM, accepted records not applied yet are in the checkpoint: the next run applies them
        # (partly applied shards included: only stored shards and the final partial shard are in the state)
        in_state = set(ids)
        pending = [r.id for t in self.book.tasks.values() for r in t.records if r.id not in in_state]
        pending = pending if self._stopping else []
        lost = sorted(set(accepted) - set(ids) - set(pending))
        n = len(ids)
        logger.info("%d edits in the final state; measuring retention", n)
        sample = spread([by_id[i] for i in ids if i in by_id], cfg.eval.max_records)
        result = ray.get(
            self.evaluator.evaluate.remote(tensors, meta, sample, generate=cfg.eval.generate, pre=True)
        )
        result["mean_steps"] = self.book.steps / self.book.outcomes if self.book.outcomes else None
        self.report = {
            "edits_seen": self.counters["edits_seen"],
            "edits_applied": n,
            "edits_applied_this_run": applied_now,
            "duplicates_applied": n - len(set(ids)),
            "duplicates_skipped": self.counters["duplicates_skipped"],
            "edits_lost": len(lost),
            "edits_pending": len(pending),
            "stopped_by_signal": self._stopping,
            "lost_ids": lost[:20],
            "resumed_from": self.resumed_from,
            "dead_lettered": self.counters["dead_lettered"],
            "actor_failures": self.counters["actor_failures"],
            "evaluated_edits": len(sample),
            **retention_fields(result, meta),
            "runtime": {
                "editors": cfg.runtime.editors,
                "shards_per_editor": cfg.runtime.shards_per_editor,
                "edits_per_second": applied_now / edit_seconds if applied_now else None,
                "checkpoints": self.store.commits if self.store else 0,
                "local_ray": self._started_ray,
                "ray_address": ray.get_runtime_context().gcs_address,
                "metrics_url": self.observer.address if self.observer else None,
            },
            "evaluations": self.evaluations,
            "seconds_per_edit": edit_seconds / applied_now if applied_now else None,
            "wall_seconds": time.perf_counter() - start,
            "state_dir": str(state_dir),
            "checkpoint_dir": str(cfg.checkpoint_dir()),
            "dead_letter": self.input.dead_letter_target
            if self.input and self.counters["dead_lettered"]
            else None,
            "serving": self.publisher.summary() if self.publisher else None,
            "per_edit": result["post"]["per_edit"],
            "config": cfg.model_dump(mode="json"),
        }
        write_report(self.report, cfg.report_path())
        self.observer.final(self.report, ids)
        return self.report

    def cleanup(self) -> None:
        """Stop the actors, close files, and shut down a Ray instance this job started (idempotent)."""
        if self.publisher is not None:
            if self.report is not None and self.cfg.publish.keep_serving_s:
                logger.info(
                    "serving %s for %.0f s more (publish.keep_serving_s)",
                    self.publisher.pool.urls,
                    self.cfg.publish.keep_serving_s,
                )
                time.sleep(self.cfg.publish.keep_serving_s)
            self.publisher.stop()
            self.publisher = None
        if self.input is not None:
            self.input.close()
        if self.store is not None:
            self.store.close()
        if self.editors or self.evaluator is not None:
            import ray

            for a in [*self.editors, self.evaluator]:
                if a is not None:
                    ray.kill(a)
            self.editors, self.evaluator = [], None
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
