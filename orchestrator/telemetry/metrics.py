"""Every Prometheus metric wisestream exports, in one place.

The job owns one :class:`JobMetrics` (a private ``CollectorRegistry``, so several jobs can live in one process)
and serves it over HTTP on ``metrics.host:metrics.port`` while it runs (:meth:`JobMetrics.serve`). Every series
carries the labels ``ray_job_id`` (the Ray job the driver runs in) and ``model`` (``model.name``); serving
series add ``replica``. Editing metrics are measured on the driver from what the editor and evaluator actors
report, so they reach Prometheus without the actors exporting anything; Ray's own system metrics (actors,
object store, CPU/GPU per node) come from Ray's metrics export port on each node (docs/metrics.md).

Names (all prefixed ``wisestream_``; counters end in ``_total`` on the wire):

============================================  =========  ============================================================
name                                          type       meaning
============================================  =========  ============================================================
``job_info``                                  info       the job's ray_job_id, model, stream and wisestream version
``edits_seen_total``                          counter    records read from the stream (duplicates, rejects included)
``edits_applied_total``                       counter    edits written into a checkpointed side memory
``edits_dead_lettered_total``                 counter    records rejected to the dead-letter file or topic
``edits_duplicate_total``                     counter    records skipped because their id was already applied
``edits_superseded_total``                    counter    edits replaced by a later edit of the same prompt
                                                         (checkpointed)
``edits_retracted_total``                     counter    edits removed by a retraction record (checkpointed)
``edits_pending``                             gauge      accepted edits not applied yet
``editor_failures_total``                     counter    editor actors that died (their shards are retrained)
``edit_latency_seconds``                      histogram  from an edit's arrival (read by the job) to its checkpointed
                                                         application by an editor
``shards_trained_total``                      counter    finished shards stored in the memory bank
``merges_total``                              counter    merges of stored shards (TIES by default)
``merge_duration_seconds``                    histogram  seconds per merge (threshold refresh included)
``retention``                                 gauge      ``metric`` (reliability, generalization, locality,
                                                         generate_reliability, generate_generalization,
                                                         locality_fixed) x ``scope`` (``all``: all past edits,
                                                         ``recent``: the most recent ``eval.recent`` edits)
``retention_edits``                           gauge      edits the state held at the last measurement, per ``scope``
``retention_timestamp_seconds``               gauge      when the last measurement arrived, per ``scope``
``side_memories``                             gauge      side memories per ``state`` (merged, pending, training)
``side_memory_bytes``                         gauge      bytes of all side memories (deltas and routing keys)
``stream_position``                           gauge      next position per ``partition`` (``file`` for an edit file,
                                                         ``topic[p]`` offsets for Kafka) up to which the job read
``consumer_lag_messages``                     gauge      Kafka: messages not yet checkpointed per ``partition``
``checkpoint_timestamp_seconds``              gauge      when the last checkpoint was committed
``checkpoint_age_seconds``                    gauge      seconds since then (computed at scrape time)
``checkpoints_total``                         counter    checkpoints committed
``published_version``                         gauge      the WISE state version a serving ``replica`` serves
``publishes_total``                           counter    successful publishes per ``replica``
``publish_failures_total``                    counter    failed publishes per ``replica`` and ``error`` (a short kind)
``publish_duration_seconds``                  histogram  seconds per successful publish, per ``replica``
``publish_timestamp_seconds``                 gauge      when ``replica`` last published successfully
``freshness_seconds``                         histogram  from an edit's arrival to the first published version that
                                                         serves it
============================================  =========  ============================================================

The serving layer calls three methods (stable API):

- :meth:`JobMetrics.publish_succeeded` ``(replica, version, seconds)`` after a replica confirmed a version,
- :meth:`JobMetrics.publish_failed` ``(replica, error)`` when a publish to a replica failed,
- :meth:`JobMetrics.edits_served` ``(edit_ids, version)`` once a version holding those edits is served by
  its first replica; it observes freshness for every id served for the first time and returns how many.

vLLM replicas keep their own ``/metrics`` (scraped directly); the dashboard uses the names in
:data:`VLLM_METRIC_NAMES`, which exist only while replicas run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server

logger = logging.getLogger(__name__)

PREFIX = "wisestream_"

#: vLLM's own per-replica metrics that the dashboard and alerts may query (vLLM 0.6+ names); they are exported by
#: the replicas' ``/metrics``, not by wisestream, and exist only while replicas run.
VLLM_METRIC_NAMES = (
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:e2e_request_latency_seconds_bucket",
)

#: Retention metrics a measurement may carry (``generate_*`` only with ``eval.generate``).
RETENTION_METRICS = (
    "reliability",
    "generalization",
    "locality",
    "generate_reliability",
    "generate_generalization",
    "locality_fixed",
)
SCOPES = ("all", "recent")

# edit latency and freshness: seconds on a GPU, minutes on a CPU, hours when a queue builds up
_LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
_MERGE_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_PUBLISH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# edit ids kept for freshness until a served version holds them; the oldest are forgotten beyond this
_MAX_UNSERVED = 100_000


class JobMetrics:
    """The metrics of one job, in their own registry.

    Args:
        ray_job_id: the Ray job id of the driver (label ``ray_job_id``).
        model: ``model.name`` (label ``model``).
        stream: a short description of the edit stream (in ``job_info`` only).
        registry: where to register (default: a new private registry).
    """

    def __init__(
        self, ray_job_id: str, model: str, stream: str = "", registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.labels = {"ray_job_id": ray_job_id, "model": model}
        base = ("ray_job_id", "model")
        r = self.registry

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, base + extra, registry=r)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(PREFIX + name, doc, base + extra, registry=r)

        def histogram(
            name: str, doc: str, buckets: Sequence[float], extra: tuple[str, ...] = ()
        ) -> Histogram:
            return Histogram(PREFIX + name, doc, base + extra, buckets=buckets, registry=r)

        info = Info(PREFIX + "job", "the job's Ray job id, model and stream", registry=r)
        from importlib.metadata import PackageNotFoundError, version

        try:
            own_version = version("wisestream")
        except PackageNotFoundError:  # running from a source tree that is not installed
            own_version = "unknown"
        info.info({**self.labels, "stream": stream, "version": own_version})

        self._seen = counter("edits_seen", "records read from the stream (duplicates and rejects included)")
        self._applied = counter("edits_applied", "edits written into a checkpointed side memory")
        self._dead = counter("edits_dead_lettered", "records rejected to the dead-letter file or topic")
        self._dup = counter("edits_duplicate", "records skipped because their id was already applied")
        self._superseded = counter("edits_superseded", "edits replaced by a later edit of the same prompt")
        self._retracted = counter("edits_retracted", "edits removed by a retraction record")
        self._pending = gauge("edits_pending", "accepted edits not applied yet")
        self._failures = counter("editor_failures", "editor actors that died (their shards are retrained)")
        self._latency = histogram(
            "edit_latency_seconds",
            "seconds from an edit's arrival to its checkpointed application",
            _LATENCY_BUCKETS,
        )
        self._shards = counter("shards_trained", "finished shards stored in the memory bank")
        self._merges = counter("merges", "merges of stored shards")
        self._merge_s = histogram("merge_duration_seconds", "seconds per merge", _MERGE_BUCKETS)
        self._retention = gauge(
            "retention",
            "retention of past edits (scope all) or recent edits (scope recent)",
            ("metric", "scope"),
        )
        self._retention_edits = gauge(
            "retention_edits", "edits in the state at the last retention measurement", ("scope",)
        )
        self._retention_ts = gauge(
            "retention_timestamp_seconds", "unix time of the last retention measurement", ("scope",)
        )
        self._memories = gauge("side_memories", "side memories per state", ("state",))
        self._memory_bytes = gauge(
            "side_memory_bytes", "bytes of all side memories (deltas and routing keys)"
        )
        self._position = gauge("stream_position", "next stream position read, per partition", ("partition",))
        self._lag = gauge("consumer_lag_messages", "Kafka messages not yet checkpointed", ("partition",))
        self._ckpt_ts = gauge("checkpoint_timestamp_seconds", "unix time of the last committed checkpoint")
        self._ckpt_age = gauge("checkpoint_age_seconds", "seconds since the last committed checkpoint")
        self._ckpts = counter("checkpoints", "checkpoints committed")
        self._version = gauge("published_version", "WISE state version served by a replica", ("replica",))
        self._publishes = counter("publishes", "successful publishes", ("replica",))
        self._publish_fail = counter("publish_failures", "failed publishes", ("replica", "error"))
        self._publish_s = histogram(
            "publish_duration_seconds", "seconds per successful publish", _PUBLISH_BUCKETS, ("replica",)
        )
        self._publish_ts = gauge(
            "publish_timestamp_seconds", "unix time of the last successful publish", ("replica",)
        )
        self._freshness = histogram(
            "freshness_seconds",
            "seconds from an edit's arrival to the first published version serving it",
            _LATENCY_BUCKETS,
        )

        # series that exist from the start (a query sees 0, not nothing)
        for c in (
            self._seen,
            self._applied,
            self._dead,
            self._dup,
            self._superseded,
            self._retracted,
            self._failures,
            self._shards,
            self._merges,
        ):
            c.labels(**self.labels)
        for h in (self._latency, self._merge_s, self._freshness):
            h.labels(**self.labels)
        self._pending.labels(**self.labels).set(0)
        self._memory_bytes.labels(**self.labels).set(0)
        for state in ("merged", "pending", "training"):
            self._memories.labels(**self.labels, state=state).set(0)
        self._ckpts.labels(**self.labels)
        self._ckpt_ts.labels(**self.labels)
        self._checkpoint_at: float | None = None
        self._ckpt_age.labels(**self.labels).set_function(self._checkpoint_age)

        self._lock = threading.Lock()  # arrival tables: the serving layer may call from its own thread
        self._totals = {
            "edits_seen": self._seen,
            "dead_lettered": self._dead,
            "duplicates_skipped": self._dup,
            "actor_failures": self._failures,
            "edits_superseded": self._superseded,
            "edits_retracted": self._retracted,
        }
        self._counted = dict.fromkeys([*self._totals, "edits_applied"], 0)
        self._arrived: dict[str, float] = {}  # accepted, not applied yet
        self._unserved: OrderedDict[str, float] = OrderedDict()  # arrived, not served by a published version
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ exporter
    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Serve ``/metrics`` on ``host:port`` (port 0: any free port) in a daemon thread.

        Returns:
            The bound ``(host, port)``.

        Raises:
            OSError: the port cannot be bound (in use, no permission).
        """
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = self._server.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # ------------------------------------------------------------------ stream
    def totals(self, counters: Mapping[str, int]) -> None:
        """Raise the counters to the job's totals (``edits_seen``, ``dead_lettered``, ``duplicates_skipped``,
        ``actor_failures``, ``edits_superseded``, ``edits_retracted``; a resumed job's totals include its earlier
        runs; a key not given is left as it is). Counters never go down."""
        with self._lock:
            for key, counter in self._totals.items():
                total = counters.get(key, 0)
                if total > self._counted[key]:
                    counter.labels(**self.labels).inc(total - self._counted[key])
                    self._counted[key] = total

    def edit_accepted(self, edit_id: str, at: float | None = None) -> None:
        """An edit entered the job (its arrival time starts edit latency and freshness)."""
        at = time.time() if at is None else at
        with self._lock:
            self._arrived[edit_id] = at
            self._unserved[edit_id] = at
            while len(self._unserved) > _MAX_UNSERVED:
                self._unserved.popitem(last=False)

    def edits_applied(self, edit_ids: Iterable[str], total: int, at: float | None = None) -> None:
        """Edits are in a committed checkpoint: observe their latency and raise the applied counter to ``total``.

        Args:
            edit_ids: the edits just applied (latency is observed once per id: a shard retrained after its
                editor died is not observed again).
            total: edits applied by the job so far; the counter never goes down (retrained edits are not
                counted twice).
            at: unix time of the checkpoint (default now).
        """
        at = time.time() if at is None else at
        with self._lock:
            for eid in edit_ids:
                arrived = self._arrived.pop(eid, None)
                if arrived is not None:  # None: accepted by an earlier run of a resumed job
                    self._latency.labels(**self.labels).observe(max(0.0, at - arrived))
            if total > self._counted["edits_applied"]:
                self._applied.labels(**self.labels).inc(total - self._counted["edits_applied"])
                self._counted["edits_applied"] = total

    def pending(self, n: int) -> None:
        self._pending.labels(**self.labels).set(n)

    def stream_position(self, state: Mapping[str, Any]) -> None:
        """The input's checkpoint state: ``{"position": n}`` (file) or ``{"offsets": [[topic, p, next], ...]}``."""
        if "position" in state:
            self._position.labels(**self.labels, partition="file").set(state["position"])
        for topic, partition, offset in state.get("offsets", ()):
            self._position.labels(**self.labels, partition=f"{topic}[{partition}]").set(offset)

    def consumer_lag(self, lag: Mapping[str, int]) -> None:
        """Kafka lag per ``topic[partition]`` (messages not yet checkpointed)."""
        for partition, n in lag.items():
            self._lag.labels(**self.labels, partition=partition).set(n)

    # ------------------------------------------------------------------ editing
    def shards_stored(self, n: int) -> None:
        self._shards.labels(**self.labels).inc(n)

    def merge_done(self, seconds: float) -> None:
        self._merges.labels(**self.labels).inc()
        self._merge_s.labels(**self.labels).observe(seconds)

    def side_memories(self, merged: int, pending: int, training: int, nbytes: int) -> None:
        for state, n in (("merged", merged), ("pending", pending), ("training", training)):
            self._memories.labels(**self.labels, state=state).set(n)
        self._memory_bytes.labels(**self.labels).set(nbytes)

    def checkpoint_committed(self, at: float) -> None:
        self._checkpoint_at = at
        self._ckpt_ts.labels(**self.labels).set(at)
        self._ckpts.labels(**self.labels).inc()

    def _checkpoint_age(self) -> float:
        return float("nan") if self._checkpoint_at is None else max(0.0, time.time() - self._checkpoint_at)

    def retention(
        self, scope: str, values: Mapping[str, float | None], edits: int, at: float | None = None
    ) -> None:
        """Set the retention gauges of ``scope`` (``all`` or ``recent``) from a measurement.

        Args:
            scope: ``all`` (all past edits, sampled while the job runs) or ``recent``.
            values: metric name -> value; names outside :data:`RETENTION_METRICS` and None values are ignored.
            edits: edits in the measured state.
            at: unix time of the measurement (default now).
        """
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        for name in RETENTION_METRICS:
            value = values.get(name)
            if value is not None:
                self._retention.labels(**self.labels, metric=name, scope=scope).set(value)
        self._retention_edits.labels(**self.labels, scope=scope).set(edits)
        self._retention_ts.labels(**self.labels, scope=scope).set(time.time() if at is None else at)

    def record(self, measurement: Mapping[str, Any]) -> None:
        """:class:`~orchestrator.telemetry.sinks.MetricsSink`: a continuous retention measurement (its ``recent`` part, when
        present, sets scope ``recent``) or a Kafka lag entry (``kind: "lag"``)."""
        if measurement.get("kind") == "lag":
            self.consumer_lag(measurement["lag"])
            return
        at = measurement.get("time")
        self.retention("all", measurement, measurement["edits"], at)
        recent = measurement.get("recent")
        if recent and recent.get("edits"):
            self.retention("recent", recent, measurement["edits"], at)

    # ------------------------------------------------------------------ serving (stable API)
    def publish_succeeded(self, replica: str, version: int, seconds: float) -> None:
        """A replica confirmed that it serves ``version``.

        Args:
            replica: the replica's name (label ``replica``).
            version: the WISE state version it serves now.
            seconds: how long the publish took (write, transfer, hot swap).
        """
        self._version.labels(**self.labels, replica=replica).set(version)
        self._publishes.labels(**self.labels, replica=replica).inc()
        self._publish_s.labels(**self.labels, replica=replica).observe(seconds)
        self._publish_ts.labels(**self.labels, replica=replica).set(time.time())

    def publish_failed(self, replica: str, error: str) -> None:
        """A publish to ``replica`` failed.

        Args:
            replica: the replica's name.
            error: a short kind of failure (an exception class name such as ``TimeoutError``), not a message:
                it becomes a label value; it is cut to 64 characters.
        """
        self._publish_fail.labels(**self.labels, replica=replica, error=error[:64]).inc()

    def edits_served(self, edit_ids: Iterable[str], version: int) -> int:
        """A published ``version`` holding ``edit_ids`` is served: observe freshness of the ids served first now.

        Args:
            edit_ids: the edits the version holds (all of them, or only the new ones; ids served before by an
                earlier version are ignored).
            version: the version (for the log).

        Returns:
            How many edits were served for the first time.
        """
        now = time.time()
        n = 0
        with self._lock:
            for eid in edit_ids:
                arrived = self._unserved.pop(eid, None)
                if arrived is not None:
                    self._freshness.labels(**self.labels).observe(max(0.0, now - arrived))
                    n += 1
        if n:
            logger.debug("version %d serves %d new edits", version, n)
        return n


def sample_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry can expose (``_total``, ``_bucket``, ``_info``, ... included), whether or not
    a series exists yet: what dashboards and alert rules may refer to."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "info": ("_info",),
        "summary": ("", "_sum", "_count", "_created"),
    }
    return {f.name + s for f in registry.collect() for s in suffixes.get(f.type, ("",))}


def exported_names() -> set[str]:
    """The sample names wisestream exports (from a throwaway :class:`JobMetrics`)."""
    return sample_names(JobMetrics("0", "model").registry)
