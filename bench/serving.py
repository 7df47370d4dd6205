"""``wisestream bench serving``: publish latency and served tokens/s with and without WISE routing, in one run.

A pool of real vLLM replicas (Ray actors) serves a checkpointed state. Measured:

- publish latency, from the publish call to every replica serving the version. Keyed layout (blocks + the
  subject routing table): a first publish of the state without its last merge group (``wise.merge_freq`` edits,
  left out of the table), then the full state, which moves what a job's publish after a merge moves (the
  block those edits went into, now a new memory id, and the whole table), then the same state again (the
  table alone, the least a keyed publish carries). Shards layout: every memory but one, the one new memory
  (what a merge in WISE-Retrieve publishes), then the thresholds only;
- served completion tokens/s for the same concurrent requests with routing on and off (``wise_set_routing``):
  the cost of routing at one layer. Half the requests are edit prompts (they name an edited subject), half are
  unrelated (locality) prompts; for the keyed layout each is checked against the routing table's subjects (the
  replicas' rule: a contiguous subject match), and the run reports the fraction expected to route and the
  fraction whose greedy completion changed when routing was switched off (routed, measured on the replicas).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from orchestrator.config import PublishConfig
from orchestrator.model_store import EMBEDDED_MODEL, resolve_model_path
from orchestrator.publish import ServeError, Source, read_source, replica_spec
from serving.pool import ServingPool
from wise.memory import Memory
from wise.publish import ServingSnapshot

logger = logging.getLogger(__name__)

# unrelated prompts for a source that records none (no journal, no --prompts file)
NEUTRAL_PROMPTS = (
    "The weather today is",
    "My favourite kind of music is",
    "A good way to start the morning is",
    "The best thing about weekends is",
)


def without_last(memories: list[Memory], n: int) -> list[Memory]:
    """Copies of ``memories`` whose last ``n`` edits (in the router's order) are left out of the routing keys;
    the task vectors are untouched. A memory whose edit list changes gets a new content id."""
    ids = [e for m in memories for e in m.edit_ids]
    drop = set(ids[len(ids) - n :]) if n > 0 else set()
    out = []
    for m in memories:
        copy = m.detached()
        copy.drop(drop)
        out.append(copy)
    return out


def publish_plan(source: Source) -> list[tuple[str, ServingSnapshot]]:
    """The publishes the benchmark times, in order, named as in the result (see the module docstring).

    Raises:
        ServeError: the state holds too few edits (keyed) or memories (shards) to publish a change.
    """
    full = source.snapshot()
    if full.layout == "keyed":
        tail = min(source.wise.merge_freq, full.n_edits - 1)
        if tail < 1:
            raise ServeError(f"{source.path} holds {full.n_edits} edit; the benchmark needs at least 2")
        return [
            ("first", source.snapshot(without_last(source.memories, tail))),
            ("after_merge", full),
            ("table_only", full),
        ]
    k = len(full.ids) - 1
    if k < 1:
        raise ServeError(f"{source.path} holds {len(full.ids)} memory; the benchmark needs at least 2")
    subset = ServingSnapshot(
        full.module_path, full.reduce, full.ids[:k], full.deltas[:k], full.thresholds[:k], full.n_edits, ()
    )
    return [("all_but_one_memory", subset), ("one_new_memory", full), ("thresholds_only", full)]


def subject_matches(snapshot: ServingSnapshot, token_ids: list[list[int]]) -> list[bool]:
    """Whether each tokenized prompt names a subject of the keyed routing table: the replicas' routing rule
    (:func:`wise.keyed.table.route` on the whole prompt), without the relation gate (``min_similarity``)."""
    from wise.keyed.table import SubjectTable, route

    r = snapshot.routing
    table = SubjectTable(r["subject_keys"], r["subject_groups"].long(), snapshot.max_len)
    d_in = r["projection"].shape[0]
    out = []
    for ids in token_ids:
        n = len(ids)
        res = route(
            torch.tensor(ids, dtype=torch.long),
            torch.zeros(n, d_in),
            torch.zeros(n, dtype=torch.long),
            torch.ones(n, dtype=torch.bool),
            1,
            table,
            r["relkeys"],
            r["projection"],
            r["center"],
            None,
        )
        out.append(bool(res.length[0] > 0))
    return out


def prompt_candidates(source: Source, prompts_file: str | None = None) -> tuple[list[str], list[str]]:
    """(edit-side prompts, unrelated prompts) for the requests.

    Edit side: the state's own edit prompts, then the prompts and rephrases of ``prompts_file`` (any edit
    file the stream parser reads: JSON/JSONL in ZsRE, CounterFact or canonical layout) or of the job's journal.
    Unrelated: their locality prompts, else :data:`NEUTRAL_PROMPTS`.
    """
    edit = [p for m in source.memories for p in m.prompts]
    other: list[str] = []
    if prompts_file:
        from streams import EditRecord, open_source

        for item in open_source(prompts_file):
            if isinstance(item.record, EditRecord):
                edit += [item.record.prompt, *item.record.rephrase]
                if item.record.locality_prompt:
                    other.append(item.record.locality_prompt)
    else:
        for rec in _journal(source):
            edit.append(rec["prompt"])
            if rec.get("locality_prompt"):
                other.append(rec["locality_prompt"])
    return list(dict.fromkeys(edit)), list(dict.fromkeys(other)) or list(NEUTRAL_PROMPTS)


def select_requests(
    edit: list[str], other: list[str], requests: int, matches=None
) -> tuple[list[str], list[bool | None]]:
    """``requests`` prompts, alternating edit-side and unrelated ones (half each), spread evenly over each list.

    Args:
        edit / other: the candidates (:func:`prompt_candidates`).
        requests: how many.
        matches: keyed layout: ``prompts -> [bool]`` (:func:`subject_matches` on their tokens); edit-side
            prompts that name no subject and unrelated ones that name one are set aside (None: no check).

    Returns:
        (prompts, whether each is expected to route: None where unknown).

    Raises:
        ServeError: no edit-side prompt names a subject of the table.
    """
    if matches is not None:
        edit = [p for p, hit in zip(edit, matches(edit), strict=True) if hit]
        if not edit:
            raise ServeError("no edit prompt names a subject of the routing table: pass --prompts FILE")
        kept = [p for p, hit in zip(other, matches(other), strict=True) if not hit]
        other = kept or list(NEUTRAL_PROMPTS)
    n_edit = (requests + 1) // 2
    picks = {"edit": _spread(edit, n_edit), "other": _spread(other, requests - n_edit)}
    prompts, expected = [], []
    for i in range(requests):
        side = "edit" if i % 2 == 0 else "other"
        prompts.append(picks[side].pop(0))
        expected.append(None if matches is None else side == "edit")
    return prompts, expected


def _spread(items: list[str], k: int) -> list[str]:
    # evenly spaced over the list (early and late edits alike), cycling when it is shorter than k
    if k <= len(items):
        return [items[i * len(items) // k] for i in range(k)]
    return [items[i % len(items)] for i in range(k)]


def _journal(source: Source) -> list[dict]:
    """The edit records journaled next to a job's checkpoint (none for a bare state directory)."""
    for base in (source.path, source.path.parent):
        for journal in (base / "journal.jsonl", base / "checkpoint" / "journal.jsonl"):
            if journal.is_file():
                with journal.open() as fh:
                    return [json.loads(line) for line in fh if line.strip()]
    return []


def _complete(url: str, prompt: str, max_tokens: int) -> tuple[int, str]:
    body = {"model": "wise", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        out = json.load(resp)
    return int(out["usage"]["completion_tokens"]), out["choices"][0]["text"]


def _throughput(urls: list[str], prompts: list[str], max_tokens: int) -> tuple[dict, list[str]]:
    """Serve every prompt once (16 in flight), round-robin over the replicas: (stats, completions)."""
    jobs = [(urls[i % len(urls)], p) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as ex:
        done = list(ex.map(lambda j: _complete(j[0], j[1], max_tokens), jobs))
    wall = time.perf_counter() - t0
    tokens = sum(n for n, _ in done)
    stats = {
        "requests": len(jobs),
        "completion_tokens": tokens,
        "seconds": wall,
        "tokens_per_second": tokens / wall,
    }
    return stats, [text for _, text in done]


def _compare(pool: ServingPool, prompts: list[str], max_tokens: int, rounds: int) -> tuple[dict, list, list]:
    """Serve ``prompts`` with routing on, then off, ``rounds`` times (alternating, so that load from other
    processes falls on both sides alike): ({side: stats summed over the rounds}, completions on, off)."""
    runs: dict[str, list[dict]] = {"routed": [], "main_only": []}
    texts: dict[str, list[str]] = {}
    try:
        for _ in range(rounds):
            for side, enabled in (("routed", True), ("main_only", False)):
                pool.set_routing(enabled)
                stats, texts[side] = _throughput(pool.urls, prompts, max_tokens)
                runs[side].append(stats)
    finally:
        pool.set_routing(True)
    out = {}
    for side, stats in runs.items():
        tokens, seconds = sum(s["completion_tokens"] for s in stats), sum(s["seconds"] for s in stats)
        out[side] = {
            "requests": sum(s["requests"] for s in stats),
            "completion_tokens": tokens,
            "seconds": seconds,
            "tokens_per_second": tokens / seconds,
            "per_round_tokens_per_second": [s["tokens_per_second"] for s in stats],
        }
    return out, texts["routed"], texts["main_only"]


def serving_benchmark(
    source: str,
    replicas: int = 2,
    requests: int = 32,
    max_tokens: int = 32,
    prompts: str | None = None,
    model: str | None = None,
    max_model_len: int = 1024,
    rounds: int = 2,
) -> dict:
    """Run the serving benchmark on the state in ``source`` (see the module docstring).

    Args:
        source: a job's checkpoint, output or state directory.
        replicas: vLLM replicas in the pool.
        requests: completions per throughput measurement.
        max_tokens: tokens per completion (EOS ignored).
        prompts: an edit file to draw request prompts from (default: the job's journal, else the state).
        model: the unedited model (default: the one the job recorded, else the embedded model).
        max_model_len: longest prompt + completion a replica accepts.
        rounds: throughput measurements per side, alternating routing on and off.

    Returns:
        A JSON-able dict.
    """
    from transformers import AutoTokenizer

    from orchestrator import cluster
    from orchestrator.config import RuntimeConfig

    for name, value, least in (
        ("--replicas", replicas, 1),
        ("--requests", requests, 2),
        ("--max-tokens", max_tokens, 1),
    ):
        if value < least:
            raise ServeError(f"{name} must be at least {least}, not {value}")
    src = read_source(source)
    model = model or src.model or EMBEDDED_MODEL
    plan = publish_plan(src)
    snapshot = plan[-1][1]
    keyed = snapshot.layout == "keyed"
    matches = None
    if keyed:
        tok = AutoTokenizer.from_pretrained(str(resolve_model_path(model)))

        def matches(texts: list[str]) -> list[bool]:
            return subject_matches(snapshot, [tok(t)["input_ids"] for t in texts])

    chosen, expected = select_requests(*prompt_candidates(src, prompts), requests, matches)
    started = cluster.connect(RuntimeConfig())
    pool = ServingPool(
        replica_spec(PublishConfig(replicas=replicas, max_model_len=max_model_len), model, src.wise), replicas
    )
    try:
        t0 = time.perf_counter()
        pool.start()
        startup = time.perf_counter() - t0
        published = {name: _pub(pool.publish(snap)) for name, snap in plan}
        if set(pool.versions().values()) != {pool.version}:
            raise ServeError(f"replicas serve {pool.versions()}, not version {pool.version}")
        _throughput(pool.urls, chosen[: min(4, requests)], 4)  # warm-up
        throughput, routed_text, main_text = _compare(pool, chosen, max_tokens, rounds)
    finally:
        pool.stop()
        if started:
            import ray

            ray.shutdown()
    changed = [a != b for a, b in zip(routed_text, main_text, strict=True)]
    result = {
        "benchmark": "serving",
        "source": str(source),
        "model": model,
        "layout": snapshot.layout,
        "replicas": replicas,
        "rounds": rounds,
        "edits": snapshot.n_edits,
        "memories": len(snapshot.ids),
        "memory_mib": round(snapshot.deltas[0].numel() * snapshot.deltas.element_size() / 2**20, 2),
        "snapshot_bytes": snapshot.nbytes(),
        "startup_seconds": startup,
        "publish": published,
        "requests": _request_summary(expected, changed, prompts or ("journal" if _journal(src) else "state")),
        "throughput": throughput,
        "routing_tokens_per_second_ratio": (
            throughput["routed"]["tokens_per_second"] / throughput["main_only"]["tokens_per_second"]
        ),
    }
    if keyed:
        result["routing_entries"] = int(snapshot.routing["columns"].shape[0])
        result["after_merge_edits"] = plan[1][1].n_edits - plan[0][1].n_edits
    return result


def _request_summary(expected: list[bool | None], changed: list[bool], prompts_from: str) -> dict:
    n = len(changed)
    out: dict = {"count": n, "prompts_from": prompts_from, "edit_prompts": (n + 1) // 2}
    out["changed_by_routing_fraction"] = sum(changed) / n
    if expected and expected[0] is not None:
        hit = [c for c, e in zip(changed, expected, strict=True) if e]
        miss = [c for c, e in zip(changed, expected, strict=True) if not e]
        out["expected_routed_fraction"] = sum(bool(e) for e in expected) / n
        out["changed_among_expected_routed"] = sum(hit) / max(len(hit), 1)
        out["changed_among_expected_main_only"] = sum(miss) / max(len(miss), 1)
    return out


def _pub(r: dict) -> dict:
    return {
        "version": r["version"],
        "seconds": r["seconds"],
        "per_replica_seconds": r["replicas"],
        "bytes": sum(r["bytes"].values()),
    }
