"""``wisestream bench serving``: publish latency and served tokens/s with and without WISE routing, in one run.

A pool of real vLLM replicas (Ray actors) serves a checkpointed state. Measured:

- publish latency, from the publish call to every replica serving the version: a first publish that moves
  every memory but one, one that moves the one new memory (what a merge in WISE-Retrieve publishes), and one
  that moves only the thresholds;
- served completion tokens/s for the same concurrent requests with routing on and off (``wise_set_routing``):
  the cost of Eq. 4's K extra projections at one layer.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from orchestrator.config import PublishConfig
from orchestrator.publish import ServeError, load_source, replica_spec
from serving.pool import ServingPool
from wise.publish import ServingSnapshot

logger = logging.getLogger(__name__)


def _subset(snap: ServingSnapshot, k: int) -> ServingSnapshot:
    return ServingSnapshot(
        snap.module_path, snap.reduce, snap.ids[:k], snap.deltas[:k], snap.thresholds[:k], snap.n_edits, ()
    )


def _complete(url: str, prompt: str, max_tokens: int) -> int:
    body = {"model": "wise", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        return int(json.load(resp)["usage"]["completion_tokens"])


def _throughput(urls: list[str], prompts: list[str], requests: int, max_tokens: int) -> dict:
    jobs = [(urls[i % len(urls)], prompts[i % len(prompts)]) for i in range(requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(16, requests)) as ex:
        tokens = sum(ex.map(lambda j: _complete(j[0], j[1], max_tokens), jobs))
    wall = time.perf_counter() - t0
    return {
        "requests": requests,
        "completion_tokens": tokens,
        "seconds": wall,
        "tokens_per_second": tokens / wall,
    }


def serving_benchmark(source: str, replicas: int = 2, requests: int = 32, max_tokens: int = 32) -> dict:
    """Run the serving benchmark on the state in ``source`` (see the module docstring); returns a JSON-able dict."""
    from orchestrator import cluster
    from orchestrator.config import RuntimeConfig

    snapshot, model, wise = load_source(source)
    if not model:
        raise ServeError(f"{source} does not record its model")
    if len(snapshot.ids) < 2:
        raise ServeError(f"{source} holds {len(snapshot.ids)} memory; the benchmark needs at least 2")
    started = cluster.connect(RuntimeConfig())
    pool = ServingPool(replica_spec(PublishConfig(replicas=replicas), model, wise), replicas)
    try:
        t0 = time.perf_counter()
        pool.start()
        startup = time.perf_counter() - t0
        first = pool.publish(_subset(snapshot, len(snapshot.ids) - 1))
        one_new = pool.publish(snapshot)
        thresholds_only = pool.publish(snapshot)
        assert set(pool.versions().values()) == {pool.version}
        prompts = _prompts(source) or ["The capital of France is"]
        _throughput(pool.urls, prompts, min(4, requests), 4)  # warm-up
        routed = _throughput(pool.urls, prompts, requests, max_tokens)
        pool.set_routing(False)
        main_only = _throughput(pool.urls, prompts, requests, max_tokens)
        pool.set_routing(True)
        mb = snapshot.deltas[0].numel() * snapshot.deltas.element_size() / 2**20
        result = {
            "benchmark": "serving",
            "source": str(source),
            "model": model,
            "replicas": replicas,
            "memories": len(snapshot.ids),
            "memory_mib": round(mb, 2),
            "edits": snapshot.n_edits,
            "startup_seconds": startup,
            "publish": {
                "all_but_one_memory": _pub(first),
                "one_new_memory": _pub(one_new),
                "thresholds_only": _pub(thresholds_only),
            },
            "throughput": {"routed": routed, "main_only": main_only},
            "routing_tokens_per_second_ratio": routed["tokens_per_second"] / main_only["tokens_per_second"],
        }
        return result
    finally:
        pool.stop()
        if started:
            import ray

            ray.shutdown()


def _pub(r: dict) -> dict:
    return {
        "version": r["version"],
        "seconds": r["seconds"],
        "per_replica_seconds": r["replicas"],
        "bytes": sum(r["bytes"].values()),
    }


def _prompts(source: str) -> list[str]:
    """Edit prompts recorded next to the state (report or journal), for realistic routing decisions."""
    from pathlib import Path

    for base in (Path(source), Path(source).parent):
        journal = (
            base / "journal.jsonl"
            if (base / "journal.jsonl").is_file()
            else base / "checkpoint" / "journal.jsonl"
        )
        if journal.is_file():
            recs = [json.loads(line) for line in journal.open()]
            return [r["prompt"] for r in recs] + [
                r["locality_prompt"] for r in recs if r.get("locality_prompt")
            ]
    return []
