"""Publishing WISE states to the vLLM serving pool: from a running job, and from a checkpoint (``wisestream serve``).

The job's :class:`Publisher` publishes the stored state (merged and pending memories) after every merge, every
``publish.every`` newly stored edits, and the final state (partial last shard included) at the end. Versions
increase monotonically across restarts (the last one is in the checkpoint). A failed publish is logged and
counted (``wisestream_publish_failures_total``, alert ``WisestreamPublishFailing``); editing goes on.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.checkpoint import MEMORIES, CheckpointError, read_memory_file
from orchestrator.config import PublishConfig
from orchestrator.model_store import resolve_model_path
from serving.pool import ReplicaSpec, ServingError, ServingPool
from wise.config import WiseConfig
from wise.memory import Memory
from wise.publish import PublishError, ServingSnapshot, snapshot_of, state_memories
from wise.state import read_state

logger = logging.getLogger(__name__)


class ServeError(RuntimeError):
    """A checkpoint or state that cannot be served, or a missing API key."""


def replica_spec(pub: PublishConfig, model: str, wise: WiseConfig) -> ReplicaSpec:
    key = None
    if pub.api_key_env:
        key = os.environ.get(pub.api_key_env)
        if not key:
            raise ServeError(f"publish.api_key_env names {pub.api_key_env}, which is not set or empty")
    return ReplicaSpec(
        model=str(resolve_model_path(model)),
        layer=wise.layer,
        module=wise.module or "mlp.down_proj",
        reduce=wise.router_reduce,
        layout=wise.layout,
        host=pub.host,
        port=pub.port,
        api_key=key,
        served_name=pub.served_name,
        max_model_len=pub.max_model_len,
        kv_cache_gib=pub.kv_cache_gib,
        cpus=pub.cpus,
        gpus=pub.gpus,
    )


class Publisher:
    """The job's side of the serving pool.

    Args:
        pub: ``publish.*`` settings.
        model: ``model.name``.
        wise: the job's WISE settings (edited layer, layout, router).
        module_path: the edited projection's path.
        setup: what the editors share (the keyed layout's relation ``center``).
        metrics: the job's :class:`~orchestrator.telemetry.metrics.JobMetrics` (or None).
        version: the last version published before a restart (from the checkpoint).
    """

    def __init__(
        self,
        pub: PublishConfig,
        model: str,
        wise: WiseConfig,
        module_path: str,
        metrics: Any = None,
        version: int = 0,
        setup: dict | None = None,
    ) -> None:
        self.pub = pub
        self.module_path = module_path
        self.wise = wise.model_dump(mode="json")
        self.setup = setup or {}
        self.pool = ServingPool(replica_spec(pub, model, wise), pub.replicas, metrics=metrics)
        self.pool.version = version
        self.published_edits = -1
        self.published_changes: tuple[int, int] | None = None  # (merges, retractions) last published
        self.failures = 0
        self.last: dict | None = None

    @property
    def version(self) -> int:
        return self.pool.version

    def start(self, memories: list[Memory] | None = None) -> list[dict]:
        """Start the replicas, and publish ``memories`` at once (a resumed job serves what it had stored)."""
        infos = self.pool.start()
        for info in infos:
            logger.info("serving replica %s at %s", info["name"], info["url"])
        if memories:
            self.publish(memories)
        return infos

    def maybe_publish(self, memories: list[Memory], merges: int, retractions: int = 0) -> dict | None:
        """Publish the stored memories if a merge or a retraction happened or ``publish.every`` edits were
        stored since (``merges``, ``retractions``: how many this run has applied so far)."""
        n = sum(len(m.edit_ids) for m in memories)
        due_merge = (merges, retractions) != self.published_changes
        due_every = self.pub.every and n - max(self.published_edits, 0) >= self.pub.every
        if n == 0 or not (due_merge or due_every) or n == self.published_edits and not due_merge:
            return None
        result = self.publish(memories)
        if result is not None:
            self.published_changes = (merges, retractions)
        return result

    def publish(self, memories: list[Memory]) -> dict | None:
        try:
            snapshot = snapshot_of(self.wise, self.module_path, memories, self.setup)
        except PublishError:
            return None
        try:
            result = self.pool.publish(snapshot)
        except ServingError as err:
            self.failures += 1
            logger.error(
                "publish failed (editing goes on; the replicas keep serving the last version): %s", err
            )
            return None
        self.published_edits = snapshot.n_edits
        self.last = {**result, "edits": snapshot.n_edits, "memories": len(snapshot.ids)}
        logger.info(
            "published version %d (%d memories, %d edits) to %d replicas in %.2f s",
            result["version"],
            len(snapshot.ids),
            snapshot.n_edits,
            len(result["replicas"]),
            result["seconds"],
        )
        return result

    def publish_final(self, memories: list[Memory]) -> None:
        """Publish the job's final state (partial last shard included) unless the replicas serve it already."""
        if sum(len(m.edit_ids) for m in memories) != self.published_edits:
            self.publish(memories)

    def summary(self) -> dict:
        return {
            "version": self.version,
            "urls": self.pool.urls,
            "failures": self.failures,
            "last": self.last,
        }

    def stop(self, linger: bool = False) -> None:
        """Stop the replicas, after ``publish.keep_serving_s`` when ``linger`` (the job finished)."""
        if linger and self.pub.keep_serving_s:
            logger.info(
                "serving %s for %.0f s more (publish.keep_serving_s)", self.pool.urls, self.pub.keep_serving_s
            )
            time.sleep(self.pub.keep_serving_s)
        self.pool.stop()


# ---------------------------------------------------------------------------------------------- serve


@dataclass(frozen=True)
class Source:
    """A servable state as read from disk: its memories in the router's order and what a snapshot needs.

    Attributes:
        path: where it was read from (for messages).
        memories: blocks / merged memories, pending shards (and a state's active shard).
        config: the dumped WISE settings (``wise_state.json`` / the job's ``wise``).
        module_path: the edited projection.
        setup: what the editors shared (the keyed layout's relation ``center``).
        model: the unedited model's name, when the job recorded it.
    """

    path: Path
    memories: list[Memory]
    config: dict
    module_path: str
    setup: dict
    model: str | None

    @property
    def wise(self) -> WiseConfig:
        return WiseConfig.model_validate(self.config)

    def snapshot(self, memories: list[Memory] | None = None) -> ServingSnapshot:
        """The snapshot of the source's memories (or of ``memories``, e.g. a subset of them).

        Raises:
            ServeError: no memory holds an edit.
        """
        try:
            return snapshot_of(
                self.config, self.module_path, self.memories if memories is None else memories, self.setup
            )
        except PublishError as err:
            raise ServeError(f"{self.path}: {err} (no shard stored yet)") from err


def read_source(path: str | Path) -> Source:
    """Read the servable state in ``path``: a job's checkpoint directory (``checkpoint.json``), a job's output
    directory (``state/``) or a state directory (``wise_state.json``).

    Raises:
        ServeError: nothing servable there.
    """
    path = Path(path)
    if not path.exists():
        raise ServeError(f"{path} does not exist: pass a job's checkpoint, output or state dir")
    if (path / "checkpoint.json").is_file():
        ckpt = json.loads((path / "checkpoint.json").read_text())
        job = ckpt.get("job") or {}
        wise = WiseConfig.model_validate(job["wise"])
        names = [*ckpt["bank"]["merged"], *ckpt["bank"]["pending"]]
        try:
            mems = [read_memory_file(path / MEMORIES / n) for n in names]
        except CheckpointError as err:
            raise ServeError(str(err)) from err
        return Source(path, mems, job["wise"], _module_path(wise), ckpt.get("setup") or {}, job.get("model"))
    state_dir = path / "state" if (path / "state" / "wise_state.json").is_file() else path
    if not (state_dir / "wise_state.json").is_file():
        raise ServeError(
            f"{path} holds no checkpoint.json, state/ or wise_state.json: pass a job's checkpoint or output dir"
        )
    tensors, meta = read_state(state_dir)
    model = None
    for report in (path / "report.json", state_dir.parent / "report.json"):
        if report.is_file():
            model = json.loads(report.read_text()).get("config", {}).get("model", {}).get("name")
            break
    return Source(state_dir, state_memories(tensors, meta), meta["config"], meta["module_path"], meta, model)


def load_source(path: str | Path) -> tuple[ServingSnapshot, str | None, WiseConfig]:
    """The servable state in ``path`` (:func:`read_source`) as a snapshot.

    Returns:
        (snapshot, model name if recorded, WISE settings).

    Raises:
        ServeError: nothing servable there.
    """
    src = read_source(path)
    return src.snapshot(), src.model, src.wise


def _module_path(wise: WiseConfig) -> str:
    # the serving architectures are Llama-family (serving/vllm_model.py): decoder layers under model.layers
    return f"model.layers.{wise.layer}.{wise.module or 'mlp.down_proj'}"


def serve(
    source: str,
    pub: PublishConfig,
    model: str | None = None,
    watch_s: float = 0.0,
    stop: threading.Event | None = None,
    on_ready=None,
) -> dict:
    """Serve a checkpointed WISE state through a pool of vLLM replicas until SIGINT/SIGTERM (or ``stop``).

    Args:
        source: checkpoint, output or state directory (:func:`load_source`).
        pub: replicas, host, port, API key.
        model: the unedited model (default: the one the job recorded).
        watch_s: re-read ``source`` this often and publish a new version when it changed (0: never).
        stop: an event that ends serving (tests); signals do too.
        on_ready: called with the pool's infos once the first version is served.

    Returns:
        ``{"version", "urls", "publishes"}`` when stopped.
    """
    from orchestrator import cluster
    from orchestrator.config import RuntimeConfig

    snapshot, recorded, wise = load_source(source)
    model = model or recorded
    if not model:
        raise ServeError(f"{source} does not record its model: pass --model")
    stop = stop or threading.Event()
    started = cluster.connect(RuntimeConfig())
    if threading.current_thread() is threading.main_thread():  # after ray.init, which installs its own
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    pool = ServingPool(replica_spec(pub, model, wise), max(1, pub.replicas))
    publishes = 0
    try:
        infos = pool.start()
        pool.publish(snapshot)
        publishes += 1
        infos = [{**i, "version": pool.version} for i in pool.infos.values()]
        logger.info("serving %d edits (%d memories) as version %d", snapshot.n_edits, len(snapshot.ids), 1)
        if on_ready is not None:
            on_ready(infos)
        while not stop.wait(watch_s or 3600):
            if not watch_s:
                continue
            try:
                fresh, _, _ = load_source(source)
            except (ServeError, OSError, ValueError) as err:  # a checkpoint mid-write: try again later
                logger.warning("re-reading %s: %s", source, err)
                continue
            if fresh.ids != snapshot.ids or not fresh.thresholds.equal(snapshot.thresholds):
                result = pool.publish(fresh)
                publishes += 1
                snapshot = fresh
                logger.info("published version %d (%d edits)", result["version"], fresh.n_edits)
        return {"version": pool.version, "urls": pool.urls, "publishes": publishes}
    finally:
        pool.stop()
        if started:
            import ray

            ray.shutdown()
