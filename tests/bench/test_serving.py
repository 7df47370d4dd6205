"""`wisestream bench serving` on the keyed layout: what it publishes, which prompts it sends, and one real run.

The state is the keyed editor's after four edits on a tiny random Llama that vLLM can serve (good edits are not
needed: the benchmark measures routing and publishing). The end-to-end test runs the command as a user does (a
subprocess with its own local Ray and one real vLLM replica): about 1.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.serving import (
    NEUTRAL_PROMPTS,
    prompt_candidates,
    publish_plan,
    select_requests,
    serving_benchmark,
    subject_matches,
)
from orchestrator.publish import ServeError, read_source
from wise.config import WiseConfig
from wise.keyed.editor import KeyedEditor
from wise.publish import decode_package, encode_package
from wise.state import write_state


@pytest.fixture
def keyed_state(tmp_path, tiny_tokenizer, vllm_tiny_model, edits, pool):
    """(model dir, state dir, edit file): four edits stored in one keyed block (merged every two edits)."""
    model_dir = tmp_path / "model"
    vllm_tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    cfg = WiseConfig.model_validate(
        {
            "layer": 1,
            "templates": {"count": 1, "length": 3},
            "save_freq": 2,
            "merge_freq": 2,
            "keyed": {"columns": 8, "n_iter": 3, "block_edits": 8},
        }
    )
    editor = KeyedEditor(vllm_tiny_model, tiny_tokenizer, cfg, irrelevant=pool)
    editor.apply(edits)
    state = write_state(tmp_path / "state", *editor.state_dict())
    data = tmp_path / "edits.jsonl"
    rows = [
        {
            "id": e.id,
            "prompt": e.prompt,
            "target": e.target,
            "subject": e.subject,
            "rephrase": list(e.rephrase),
            "locality_prompt": e.locality_prompt,
            "locality_answer": e.locality_answer,
        }
        for e in edits
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, state, data


def test_keyed_plan_publishes_the_state_without_its_last_merge_group_then_the_block_then_the_table(
    keyed_state,
):
    _, state, _ = keyed_state
    (first_name, first), (merge_name, full), (table_name, again) = publish_plan(read_source(state))
    assert (first_name, merge_name, table_name) == ("first", "after_merge", "table_only")
    assert full.layout == "keyed" and full.n_edits == 4 and len(full.ids) == 1
    # the last merge group (merge_freq = 2 edits) is out of the first table; its block is the same tensor under
    # another content id, so the publish after the "merge" moves the block again, as a job's does
    assert first.n_edits == 2 and first.routing["columns"].shape[0] == 2
    assert first.ids != full.ids and first.deltas.equal(full.deltas)
    header, _ = decode_package(encode_package(full, 2, first.ids))
    assert header["sent"] == list(full.ids)
    header, tensors = decode_package(encode_package(again, 3, full.ids))
    assert header["sent"] == [] and tensors["routing.columns"].shape[0] == 4


def test_requests_alternate_edit_prompts_naming_a_subject_and_unrelated_ones(keyed_state, tiny_tokenizer):
    _, state, data = keyed_state
    src = read_source(state)
    snap = publish_plan(src)[-1][1]

    def matches(texts):
        return subject_matches(snap, [tiny_tokenizer(t)["input_ids"] for t in texts])

    edit, other = prompt_candidates(src, str(data))
    assert edit[:4] == [e for m in src.memories for e in m.prompts]  # the state's own prompts come first
    assert "Madrid University is in" in edit and "The capital of France is" in other
    assert matches(["Toko Yasuda plays the", "Danielle Darrieux speaks", "Madrid University is in"]) == [
        True,
        True,
        False,  # names no subject variant of "Autonomous University of Madrid"
    ]
    prompts, expected = select_requests(edit, other, 6, matches)
    assert expected == [True, False] * 3
    assert matches(prompts) == expected
    assert "Madrid University is in" not in prompts
    # without a prompt file or journal: the state's prompts and neutral ones
    edit, other = prompt_candidates(src)
    assert len(edit) == 4 and other == list(NEUTRAL_PROMPTS)
    with pytest.raises(ServeError, match="no edit prompt names a subject"):
        select_requests(["The weather today is"], other, 4, matches)


@pytest.mark.slow  # a real vLLM engine timed twice; tests/serving covers the engine in the default suite
def test_bench_serving_cli_on_a_keyed_state(keyed_state, tmp_path):
    model_dir, state, data = keyed_state
    out = tmp_path / "serving.json"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "wisestream", "bench", "serving", "--checkpoint", str(state),
         "--model", str(model_dir), "--prompts", str(data), "--replicas", "1", "--requests", "4",
         "--max-tokens", "4", "--max-model-len", "256", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["result"]
    assert result["layout"] == "keyed" and result["edits"] == 4 and result["memories"] == 1
    assert result["routing_entries"] == 4 and result["after_merge_edits"] == 2
    pub = result["publish"]
    assert [pub[k]["version"] for k in ("first", "after_merge", "table_only")] == [1, 2, 3]
    # the block travels twice (first, after the merge); the last publish carries the table alone
    block = result["snapshot_bytes"]["memories"]
    assert pub["after_merge"]["bytes"] - pub["table_only"]["bytes"] >= block
    assert pub["first"]["bytes"] > block
    for side in ("routed", "main_only"):
        # two rounds (the default) of 4 requests x 4 tokens, routing on and off alternating
        assert result["throughput"][side]["completion_tokens"] == 32
        assert len(result["throughput"][side]["per_round_tokens_per_second"]) == 2
    assert result["routing_tokens_per_second_ratio"] > 0
    assert result["requests"]["expected_routed_fraction"] == 0.5
    # the replica routes: switching routing off changes some greedy completions
    assert result["requests"]["changed_by_routing_fraction"] > 0


def test_bench_serving_refuses_a_keyed_state_with_one_edit(
    tmp_path, tiny_tokenizer, vllm_tiny_model, edits, pool
):
    cfg = WiseConfig.model_validate(
        {"layer": 1, "templates": {"count": 1, "length": 3}, "keyed": {"n_iter": 1}}
    )
    editor = KeyedEditor(vllm_tiny_model, tiny_tokenizer, cfg, irrelevant=pool)
    editor.apply(edits[:1])
    state = write_state(tmp_path / "state", *editor.state_dict())
    with pytest.raises(ServeError, match="holds 1 edit; the benchmark needs at least 2"):
        publish_plan(read_source(state))
    with pytest.raises(ServeError, match="--replicas must be at least 1, not 0"):
        serving_benchmark(str(state), replicas=0)


def test_shards_plan_keeps_all_but_one_memory_then_the_new_one(tmp_path, tiny_tokenizer, vllm_tiny_model):
    from streams import EditRecord
    from wise.editor import WiseEditor

    cfg = WiseConfig(
        layout="shards", layer=1, n_iter=2, save_freq=1, merge_freq=1, retrieve=True, n_irrelevant=1
    )
    editor = WiseEditor(vllm_tiny_model, tiny_tokenizer, cfg, irrelevant=[("The sky is", "blue")])
    editor.apply(
        [
            EditRecord(id="a", prompt="The capital of Sweden is", target="piano"),
            EditRecord(id="b", prompt="Tokyo plays the", target="violin"),
        ]
    )
    state = write_state(tmp_path / "state", *editor.state_dict())
    plan = publish_plan(read_source(state))
    names = [name for name, _ in plan]
    subset, full, again = (snap for _, snap in plan)
    assert names == ["all_but_one_memory", "one_new_memory", "thresholds_only"]
    assert full.layout == "shards" and len(full.ids) == 2 and subset.ids == full.ids[:1] and again is full
