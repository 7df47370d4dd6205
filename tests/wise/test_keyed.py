"""The keyed layout: subject routing, the residual, the trainer, the bank and the single-process editor.

Routing and the residual have exact references (a Python loop over n-grams, a dense masked product); the editor
runs on the tiny random model; the flattened, held route of the vLLM replicas must equal the Hugging Face
router's decisions over a prefill and its decode steps.
"""

import copy
import dataclasses

import pytest
import torch

from wise.config import WiseConfig
from wise.evaluate import evaluate_records, greedy_generate, greedy_generate_batch
from wise.keyed.bank import KeyedBank
from wise.keyed.editor import KeyedEditor, live_memories
from wise.keyed.table import SubjectTable, ngram_hashes, residual, route, run_lengths, variant_hash
from wise.keyed.trainer import edit_columns, normalize_prompt
from wise.memory import Memory
from wise.publish import Hold, ServingSnapshot, decode_package, encode_package, keyed_flat


def _cfg(**kw):
    base = dict(
        layer=2,
        templates={"count": 2, "length": 3},
        save_freq=2,
        merge_freq=2,
        keyed={"columns": 16, "n_iter": 40, "lr": 0.1, "early_stop_loss": 0.05, "block_edits": 4},
    )
    base.update(kw)
    return WiseConfig.model_validate(base)


# ---------------------------------------------------------------------------------------------- table
def test_ngram_hashes_equal_variant_hashes_of_the_same_tokens():
    ids = torch.tensor([7, 3, 9, 9, 1])
    hashes = ngram_hashes(ids, 3)
    for i in range(5):
        for n in range(1, 4):
            if i - n + 1 >= 0:
                assert int(hashes[i, n - 1]) == variant_hash(ids[i - n + 1 : i + 1].tolist())
    assert variant_hash([3, 9]) != variant_hash([9, 3]) != variant_hash([3])


def test_run_lengths_restart_at_segments_and_off_span():
    span = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1]).bool()
    seg = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    assert run_lengths(span, seg).tolist() == [1, 2, 3, 0, 1, 1, 2, 3]


def _route_reference(ids, spans, subjects, relkeys, x, proj):
    """Per sequence: the longest subject variant inside its span (last occurrence on ties), then the entry with
    the most similar relation key among those holding it, the query's relation being the mean of its span's
    tokens other than the matched subject's."""
    out = []
    for b, (seq, span) in enumerate(zip(ids, spans, strict=True)):
        toks = [t if s else None for t, s in zip(seq, span, strict=True)]
        best_len, best_entries, best_pos = 0, [], []
        for e, variants in enumerate(subjects):
            for v in variants:
                n = len(v)
                starts = [i for i in range(len(toks) - n + 1) if toks[i : i + n] == v]
                if starts and n > best_len:
                    best_len, best_entries, best_pos = n, [e], list(range(starts[-1], starts[-1] + n))
                elif starts and n == best_len and e not in best_entries:
                    best_entries.append(e)
        if not best_entries:
            out.append(-1)
            continue
        keep = [i for i in range(len(seq)) if span[i] and i not in best_pos] or [
            i for i in range(len(seq)) if span[i]
        ]
        q = torch.nn.functional.normalize(x[b * len(seq) + torch.tensor(keep)].mean(0) @ proj, dim=0)
        sims = [float(relkeys[e] @ q) for e in best_entries]
        out.append(best_entries[max(range(len(sims)), key=sims.__getitem__)])
    return out


def test_route_picks_the_longest_subject_then_the_nearest_relation():
    subjects = [[[5, 6]], [[5]], [[5, 6]], [[8, 9, 4]], []]
    table = SubjectTable.build(subjects)
    seqs = [[1, 5, 6, 2], [5, 3, 3, 3], [8, 9, 4, 5], [7, 7, 7, 7], [3, 5, 6, 0]]
    spans = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]  # the last cuts [5, 6]
    d_in, r = 6, 4
    x = torch.randn(len(seqs) * 4, d_in)
    proj = torch.randn(d_in, r)
    relkeys = torch.nn.functional.normalize(torch.randn(len(subjects), r), dim=-1)
    args = (
        torch.tensor(seqs).flatten(),
        x,
        torch.arange(len(seqs)).repeat_interleave(4),
        torch.tensor(spans).bool().flatten(),
        len(seqs),
        table,
        relkeys,
        proj,
        None,
    )
    res = route(*args)
    assert res.choice.tolist() == _route_reference(seqs, spans, subjects, relkeys, x, proj)
    assert res.choice.tolist()[1] == 1 and res.choice.tolist()[3] == -1 and res.choice.tolist()[4] == 1
    assert res.length.tolist() == [2, 1, 3, 0, 1]
    # the relation gate: nothing is that similar, so every route is refused
    assert route(*args, min_similarity=1.01).choice.tolist() == [-1] * len(seqs)


@pytest.mark.parametrize("with_values", [False, True])
def test_residual_is_the_masked_dense_product_of_the_entry_memory(with_values):
    d_in, d_out, k = 10, 3, 4
    mems = torch.randn(2, d_out, d_in)
    columns = torch.stack([torch.randperm(d_in)[:k] for _ in range(3)])
    memory_of = torch.tensor([0, 1, 1])
    values = torch.randn(3, d_out) if with_values else None
    x = torch.randn(5, d_in)
    entry = torch.tensor([0, -1, 2, 1, 2])
    table_t = torch.cat([m.T for m in mems])
    got = residual(x, entry, columns, memory_of, table_t, values)
    for t in range(5):
        e = int(entry[t])
        if e < 0:
            assert torch.count_nonzero(got[t]) == 0
            continue
        mask = torch.zeros(d_in)
        mask[columns[e]] = 1
        want = mems[memory_of[e]] @ (x[t] * mask)
        torch.testing.assert_close(got[t], want + values[e] if with_values else want)


def test_edit_columns_are_a_pure_function_of_seed_and_index():
    a, b = edit_columns(64, 8, 0, 5), edit_columns(64, 8, 0, 5)
    assert torch.equal(a, b) and a.unique().numel() == 8
    assert not torch.equal(a, edit_columns(64, 8, 0, 6)) and not torch.equal(a, edit_columns(64, 8, 1, 5))


def test_prompt_normalisation_ignores_case_spacing_and_final_punctuation():
    assert normalize_prompt("The  capital of France is?") == normalize_prompt("the capital of france is")
    assert normalize_prompt("The capital of France is") != normalize_prompt("The capital of Spain is")


# ---------------------------------------------------------------------------------------------- bank
def _shard(sid, ids, value, prompts=None, k=2):
    m = Memory(
        torch.full((3, 6), float(value)),
        edit_ids=list(ids),
        prompts=list(prompts or [f"prompt {i}" for i in ids]),
        targets=["t"] * len(ids),
        shard_ids=[sid],
        columns=torch.zeros(len(ids), k, dtype=torch.long),
        relkeys=torch.zeros(len(ids), 4, dtype=torch.float16),
        subjects=[[[1]] for _ in ids],
    )
    return m


def test_bank_merges_groups_into_blocks_adding_what_each_shard_changed():
    cfg = WiseConfig(save_freq=1, merge_freq=2, keyed={"block_edits": 4})
    bank = KeyedBank(cfg)
    assert bank.base() is None and bank.startable(1, 0) and not bank.startable(2, 1)
    assert not bank.store(_shard(0, ["a"], 1.0))  # group 0 = shards 0, 1, both from a zero base
    assert bank.store(_shard(1, ["b"], 2.0))
    torch.testing.assert_close(bank.merged[0].delta, torch.full((3, 6), 3.0))
    base = bank.base()
    assert base is bank.merged[0].delta and bank.startable(2, 2)
    # group 1 started from the block (3.0): each shard's change is its value minus 3
    bank.store(_shard(2, ["c"], 3.5))
    bank.store(_shard(3, ["d"], 5.0))
    torch.testing.assert_close(bank.merged[0].delta, torch.full((3, 6), 3.0 + 0.5 + 2.0))
    assert bank.edit_ids() == ["a", "b", "c", "d"] and len(bank.merged) == 1
    bank.store(_shard(4, ["e"], 1.0))  # edit 4 opens block 1, from a zero base
    bank.store(_shard(5, ["f"], 1.0))
    assert len(bank.merged) == 2 and bank.merged[1].edit_ids == ["e", "f"]
    torch.testing.assert_close(bank.merged[1].delta, torch.full((3, 6), 2.0))


def test_bank_supersedes_earlier_edits_of_the_same_prompt_and_retracts_on_request():
    cfg = WiseConfig(save_freq=2, merge_freq=2, keyed={"block_edits": 4})
    bank = KeyedBank(cfg)
    bank.store(_shard(0, ["a", "b"], 0.0, ["The capital of X is", "Y plays the"]))
    bank.store(_shard(1, ["c", "d"], 0.0, ["the capital of x is?", "Z plays the"]))
    assert bank.edit_ids() == ["b", "c", "d"] and bank.superseded == ["a"]
    assert bank.merged[0].columns.shape[0] == 3 and len(bank.merged[0].subjects) == 3
    assert bank.retract(["d", "nope"]) == ["d"] and bank.edit_ids() == ["b", "c"] and bank.retracted == ["d"]
    tensors, meta = bank.state()
    again = KeyedBank(cfg)
    again.load(tensors, meta)
    assert again.edit_ids() == ["b", "c"] and again.superseded == ["a"] and again.retracted == ["d"]


def test_live_memories_hide_an_edit_whose_prompt_a_later_one_repeats():
    older = _shard(0, ["a", "b"], 0.0, ["P one", "P two"])
    newer = _shard(1, ["c"], 0.0, ["p one"])
    live = live_memories([older, newer])
    assert [m.edit_ids for m in live] == [["b"], ["c"]] and older.edit_ids == ["a", "b"]


# ---------------------------------------------------------------------------------------------- editor
def test_keyed_editor_learns_edits_routes_by_subject_and_round_trips(tiny_model, tiny_tokenizer, edits, pool):
    fresh = copy.deepcopy(tiny_model)
    ed = KeyedEditor(tiny_model, tiny_tokenizer, _cfg(), irrelevant=pool)
    outs = ed.apply(edits[:3])
    assert [o.edit_id for o in outs] == ["e0", "e1", "e2"] and all(o.steps >= 1 for o in outs)
    assert len(ed.merged) == 1 and ed.merged[0].edit_ids == ["e0", "e1"] and ed.active.edit_ids == ["e2"]
    res = evaluate_records(ed.model, ed.routed, ed.tokens, edits[:3], generate=False)
    assert res["teacher_forced"]["reliability"] == 1.0
    assert res["routed_fraction"]["edit"] == 1.0
    # e0's and e1's rephrases name their subject and route; the locality prompts name none of the subjects
    assert res["routed_fraction"]["rephrase"] == 1.0 and res["routed_fraction"]["locality"] == 0.0
    assert res["teacher_forced"]["locality"] == 1.0
    # an edit writes only its own columns: everything else of the block is zero
    block = ed.merged[0].delta
    written = torch.zeros_like(block, dtype=torch.bool)
    for cols in ed.merged[0].columns:
        written[:, cols] = True
    assert torch.count_nonzero(block[~written]) == 0 and torch.count_nonzero(block[written]) > 0
    # the state reloads into a fresh editor and answers identically
    tensors, meta = ed.state_dict()
    other = KeyedEditor(fresh, tiny_tokenizer, _cfg(), irrelevant=pool)
    other.load_state_dict(tensors, meta)
    again = evaluate_records(other.model, other.routed, other.tokens, edits[:3], generate=False)
    assert again["per_edit"] == res["per_edit"]
    # what the state costs: the routed blocks (merged block + active shard) and the routing table, per edit
    from orchestrator.report import memory_cost

    cost = memory_cost(tensors, meta, model_bytes=10**6)
    assert cost["memory_bytes"] == 2 * block.numel() * block.element_size() and cost["routing_bytes"] > 0
    assert cost["bytes"] == cost["memory_bytes"] + cost["routing_bytes"] and cost["memories"] == 2
    assert cost["bytes_per_edit"] == cost["bytes"] / 3 and cost["percent_of_model"] == cost["bytes"] / 1e4


def test_keyed_editor_and_snapshot_leave_a_subject_inside_a_longer_name_to_the_main_memory(
    tiny_model, tiny_tokenizer, edits, pool
):
    inside = dataclasses.replace(
        edits[0], id="p0", prompt="Jill Danielle Darrieux is a native speaker of", rephrase=()
    )
    ed = KeyedEditor(tiny_model, tiny_tokenizer, _cfg(), irrelevant=pool)
    ed.apply(edits[:1])
    res = evaluate_records(ed.model, ed.routed, ed.tokens, [*edits[:1], inside], generate=False)
    assert [e["routed"] for e in res["per_edit"]] == [True, False]
    ed.routed.name_flags = None  # the same router without the rule
    res = evaluate_records(ed.model, ed.routed, ed.tokens, [*edits[:1], inside], generate=False)
    assert [e["routed"] for e in res["per_edit"]] == [True, True]
    # what a replica serves carries the rule, unless the state's settings turn it off
    tensors, meta = ed.state_dict()
    snap = ServingSnapshot.from_state(tensors, meta)
    assert torch.equal(snap.routing["name_flags"], ed.trainer.name_flags)
    meta["config"]["keyed"]["whole_names"] = False
    assert "name_flags" not in ServingSnapshot.from_state(tensors, meta).routing


def test_keyed_editor_retracts_and_supersedes(tiny_model, tiny_tokenizer, edits, pool):
    ed = KeyedEditor(tiny_model, tiny_tokenizer, _cfg(), irrelevant=pool)
    ed.apply(edits[:2])
    pre = evaluate_records(ed.model, ed.routed, ed.tokens, edits[:1], main_only=True, generate=False)
    assert ed.retract(["e0"]) == ["e0"] and ed.applied_ids() == ["e1"]
    after = evaluate_records(ed.model, ed.routed, ed.tokens, edits[:2], generate=False)
    assert after["per_edit"][0]["routed"] is False
    assert after["per_edit"][0]["reliability"] == pre["per_edit"][0]["reliability"]
    assert after["per_edit"][1]["reliability"] == 1.0
    # the same prompt edited again: the new target wins, the old edit leaves the state when its shard stores
    new = dataclasses.replace(edits[1], id="e1b", target="violin")
    ed.apply([new, edits[2]])
    res = evaluate_records(ed.model, ed.routed, ed.tokens, [new], generate=False)
    assert res["teacher_forced"]["reliability"] == 1.0
    assert "e1" not in ed.applied_ids() and ed.bank.superseded == ["e1"]


# value_lr in units of the edited layer's output: the tiny model's are far smaller than SmolLM2's
VALUES = {
    "columns": 16,
    "n_iter": 40,
    "lr": 0.1,
    "early_stop_loss": 0.05,
    "block_edits": 4,
    "values": True,
    "value_lr": 0.1,
}


def test_keyed_values_are_one_vector_per_live_edit_and_travel_with_it(
    tiny_model, tiny_tokenizer, edits, pool
):
    """keyed.values: every edit stores its own output vector beside its columns; merging, reloading,
    retracting and superseding keep vectors and edits aligned, and the state's cost counts them."""
    from orchestrator.report import memory_cost

    fresh = copy.deepcopy(tiny_model)
    ed = KeyedEditor(tiny_model, tiny_tokenizer, _cfg(keyed=VALUES), irrelevant=pool)
    ed.apply(edits[:3])
    d_out = ed.routed.d_out
    assert ed.merged[0].values.shape == (2, d_out) and ed.active.values.shape == (1, d_out)
    assert ed.merged[0].values.dtype == torch.float16 and torch.count_nonzero(ed.merged[0].values) > 0
    res = evaluate_records(ed.model, ed.routed, ed.tokens, edits[:3], generate=False)
    assert res["teacher_forced"]["reliability"] == 1.0 and res["teacher_forced"]["locality"] == 1.0
    tensors, meta = ed.state_dict()
    other = KeyedEditor(fresh, tiny_tokenizer, _cfg(keyed=VALUES), irrelevant=pool)
    other.load_state_dict(tensors, meta)
    again = evaluate_records(other.model, other.routed, other.tokens, edits[:3], generate=False)
    assert again["per_edit"] == res["per_edit"]
    snap = ServingSnapshot.from_state(tensors, meta)
    assert snap.routing["values"].shape == (3, d_out)
    others = sum(t.numel() * t.element_size() for k, t in snap.routing.items() if k != "values")
    assert memory_cost(tensors, meta, model_bytes=10**6)["routing_bytes"] == others + 3 * d_out * 2
    # the vectors answer: without them the routed edits read only their columns
    with torch.no_grad():
        kept = ed.routed.values.clone()
        ed.routed.values.zero_()
        bare = evaluate_records(ed.model, ed.routed, ed.tokens, edits[:3], generate=False)
        ed.routed.values.copy_(kept)
    assert bare["per_edit"] != res["per_edit"]
    # retract e0, then edit e1's prompt again: each remaining vector stays with its edit
    by_id = {e: v.clone() for m in ed.bank.memories() for e, v in zip(m.edit_ids, m.values, strict=True)}
    by_id["e2"] = ed.active.values[0].clone()
    ed.retract(["e0"])
    ed.apply([dataclasses.replace(edits[1], id="e1b", target="violin"), edits[3]])
    mems = [*ed.bank.memories(), ed.active]
    assert all(m.values.shape[0] == len(m.edit_ids) for m in mems)
    now = {e: v for m in mems for e, v in zip(m.edit_ids, m.values, strict=True)}
    assert set(now) == {"e1b", "e2", "e3"} and torch.equal(now["e2"], by_id["e2"])
    assert ed.routed.values.shape == (3, d_out)


# ---------------------------------------------------------------------------------------------- serving


@pytest.mark.parametrize("with_values", [False, True])
def test_flat_held_route_equals_the_hf_router_over_prefill_and_decode(
    tiny_model, tiny_tokenizer, edits, pool, with_values
):
    """vLLM's layout: the three prompts prefilled in one flattened batch, then decode steps of one token each
    (two sequences at a time); every step's side-memory contribution equals what KeyedLinear adds when it holds
    the prefill's route, and a held decode token differs from routing it on itself (with and without the
    edits' own output vectors)."""
    cfg = _cfg(keyed=VALUES) if with_values else _cfg()
    ed = KeyedEditor(tiny_model, tiny_tokenizer, cfg, irrelevant=pool)
    ed.apply(edits[:3])
    snap = ServingSnapshot.from_state(*ed.state_dict())
    header, tensors = decode_package(encode_package(snap, 1))
    assert ("routing.values" in tensors) == with_values
    table = _flat_table(tensors)
    table_t = torch.cat([tensors[f"delta.{mid}"].T for mid in header["ids"]])
    prompts = [edits[0].prompt, "Where is the Eiffel Tower?", edits[2].prompt]
    routed, tokens = ed.routed, ed.tokens
    captured = {}
    hook = routed.register_forward_pre_hook(lambda _m, args: captured.__setitem__("a", args[0]))
    held = torch.full((64,), -1, dtype=torch.long)
    try:
        ids_list, hf_extra = [], []
        for p in prompts:
            ids = torch.tensor([tokens.prompt(p)])
            with routed.hold_route(), routed.query_span(torch.ones_like(ids, dtype=torch.bool)):
                out = ed.model(input_ids=ids, use_cache=False)
                a = captured["a"][0]
                with routed.main_only():
                    main = a @ routed.weight.T
                hf_extra.append(routed(a.unsqueeze(0))[0] - main)
            ids_list.append(ids[0])
            nxt = int(out.logits[0, -1].argmax())
            ids_list[-1] = torch.cat([ids_list[-1], torch.tensor([nxt])])
        # prefill: all three prompts laid end to end
        lens = [len(tokens.prompt(p)) for p in prompts]
        x = torch.cat([captured_prompt(ed, tokens.prompt(p)) for p in prompts])
        flat_ids = torch.cat([torch.tensor(tokens.prompt(p)) for p in prompts])
        starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        hold = Hold(torch.tensor(lens), torch.tensor([3, 9, 17]), held)
        got = keyed_flat(x, flat_ids, starts, table, header["max_len"], table_t, None, hold)
        torch.testing.assert_close(got, torch.cat(hf_extra), atol=1e-4, rtol=1e-4)
        assert held[[3, 9, 17]].tolist() == routed_choices(ed, prompts)
        # decode: sequences 0 and 2, one token each, after their prompt
        dec = torch.randn(2, routed.d_in)
        dec_ids = torch.tensor([ids_list[0][-1], ids_list[2][-1]])
        hold = Hold(torch.tensor([lens[0] + 1, lens[2] + 1]), torch.tensor([3, 17]), held)
        got = keyed_flat(dec, dec_ids, torch.tensor([0, 1, 2]), table, header["max_len"], table_t, None, hold)
        choices = routed_choices(ed, prompts)
        for row, seq in enumerate([0, 2]):
            with routed.hold_route():
                routed._held = torch.tensor([choices[seq]])
                want = routed(dec[row].view(1, 1, -1))[0, 0] - dec[row] @ routed.weight.T
            torch.testing.assert_close(got[row], want, atol=1e-4, rtol=1e-4)
        assert torch.count_nonzero(got[0]) > 0  # sequence 0 routed at prefill keeps its edit while decoding
        unheld = keyed_flat(
            dec, dec_ids, torch.tensor([0, 1, 2]), table, header["max_len"], table_t, None, None
        )
        assert torch.count_nonzero(unheld[0]) == 0  # one token alone names no subject: re-routing drops it
    finally:
        hook.remove()


def captured_prompt(ed, ids):
    captured = {}
    hook = ed.routed.register_forward_pre_hook(lambda _m, args: captured.__setitem__("a", args[0]))
    try:
        with ed.routed.main_only(), torch.no_grad():
            ed.model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        hook.remove()
    return captured["a"][0]


def routed_choices(ed, prompts):
    out = []
    for p in prompts:
        ids = torch.tensor([ed.tokens.prompt(p)])
        with torch.no_grad(), ed.routed.query_span(torch.ones_like(ids, dtype=torch.bool)):
            ed.model(input_ids=ids, use_cache=False)
        out.append(int(ed.routed.last_choice[0]))
    return out


def test_held_generation_keeps_the_prompt_route(tiny_model, tiny_tokenizer, edits, pool):
    ed = KeyedEditor(tiny_model, tiny_tokenizer, _cfg(), irrelevant=pool)
    ed.apply(edits[:1])
    budget = len(ed.tokens.answer(edits[0].target)) + 1
    text = greedy_generate(ed.model, ed.routed, ed.tokens, edits[0].prompt, budget)
    assert edits[0].target in text


def test_batched_generation_equals_one_prompt_at_a_time(tiny_model, tiny_tokenizer, edits, pool):
    # left-padded prompts of different lengths, each routed on its own tokens at the prefill and held: the same
    # continuations (and routes) as generating each prompt alone
    ed = KeyedEditor(tiny_model, tiny_tokenizer, _cfg(), irrelevant=pool)
    ed.apply(edits[:4])
    prompts = [e.prompt for e in edits[:4]] + [p for p, _ in pool[:4]] + ["Hi", edits[0].prompt + " and then"]
    budgets = [1 + i % 5 for i in range(len(prompts))]
    alone = [
        greedy_generate(ed.model, ed.routed, ed.tokens, p, n) for p, n in zip(prompts, budgets, strict=True)
    ]
    together = greedy_generate_batch(ed.model, ed.routed, ed.tokens, prompts, budgets)
    assert together == alone
    assert sum(c >= 0 for c in routed_choices(ed, prompts)) >= 4  # the edits' prompts were routed
    main = [greedy_generate(ed.model, ed.routed, ed.tokens, p, 5, main_only=True) for p in prompts]
    assert (
        greedy_generate_batch(ed.model, ed.routed, ed.tokens, prompts, [5] * len(prompts), main_only=True)
        == main
    )
    assert main != alone  # the routed side memories change what is generated


@pytest.mark.parametrize("bad", ["layout", "table"])
def test_keyed_packages_are_checked(bad, tiny_model, tiny_tokenizer, edits, pool):
    ed = KeyedEditor(tiny_model, tiny_tokenizer, _cfg(), irrelevant=pool)
    ed.apply(edits[:1])
    snap = ServingSnapshot.from_state(*ed.state_dict())
    from wise.publish import PublishError

    if bad == "layout":
        snap = dataclasses.replace(snap, layout="dense")
        with pytest.raises(PublishError, match="unknown memory layout"):
            decode_package(encode_package(snap, 1))
    else:
        snap = dataclasses.replace(snap, routing={k: v for k, v in snap.routing.items() if k != "relkeys"})
        with pytest.raises(PublishError, match="without its routing table"):
            decode_package(encode_package(snap, 1))


@pytest.mark.parametrize(("source", "target"), [("mean", "residual"), ("residual", "mean")])
def test_a_rekeyed_state_holds_the_keys_that_editing_with_the_other_key_stores(
    tiny_model, tiny_tokenizer, edits, pool, tmp_path, source, target
):
    from helpers import tiny_keyed_config

    from wise.state import StateError

    dims = {"mean": {}, "residual": {"relation_dim": 32}}  # residual kept whole: the tiny model's width
    models = [copy.deepcopy(tiny_model) for _ in range(3)]
    src = KeyedEditor(
        tiny_model, tiny_tokenizer, tiny_keyed_config(5, relation_key=source, **dims[source]), pool
    )
    src.apply(edits)
    src.save(tmp_path / "state")
    cfg = tiny_keyed_config(5, relation_key=target, **dims[target])
    direct = KeyedEditor(models[0], tiny_tokenizer, cfg, pool)
    direct.apply(edits)
    rekeyed = KeyedEditor(models[1], tiny_tokenizer, cfg, pool)
    rekeyed.load_rekeyed(tmp_path / "state")
    assert rekeyed.n_edits == len(edits)
    mems = list(zip(rekeyed.routable(), direct.routable(), src.routable(), strict=True))
    for a, b, s in mems:
        assert a.edit_ids == b.edit_ids == s.edit_ids
        # the key does not change what an edit writes; re-keying keeps what it wrote
        assert torch.equal(a.delta, s.delta) and torch.allclose(b.delta, s.delta)
        assert a.relkeys.shape == b.relkeys.shape and a.relkeys.shape != s.relkeys.shape
        assert torch.allclose(a.relkeys.float(), b.relkeys.float(), atol=2e-3)
    assert torch.allclose(rekeyed.trainer.center.float(), direct.trainer.center.float(), atol=1e-4)
    other = KeyedEditor(models[2], tiny_tokenizer, tiny_keyed_config(5, columns=8), pool)
    with pytest.raises(StateError, match=r"keyed\.columns"):
        other.load_rekeyed(tmp_path / "state")


def test_flat_route_with_residual_keys_equals_the_hf_router(tiny_model, tiny_tokenizer, edits, pool):
    """A state keyed by the residual stream in vLLM's layout: the relation key reads the edited block's input at
    each prompt's last token (what the serving module rebuilds from vLLM's ``hidden_states`` and its deferred
    ``residual``), and every prompt gets what KeyedLinear adds, the choice between two relations of one subject
    included."""
    from helpers import tiny_keyed_config

    from serving.vllm_model import WiseRoutedProjection

    ed = KeyedEditor(
        tiny_model, tiny_tokenizer, tiny_keyed_config(5, relation_key="residual", relation_dim=32), pool
    )
    born = dataclasses.replace(edits[0], id="e4", prompt="Danielle Darrieux was born in", target="Rome")
    ed.apply([*edits, born])
    snap = ServingSnapshot.from_state(*ed.state_dict())
    header, tensors = decode_package(encode_package(snap, 1))
    assert header["relation_key"] == "residual"
    table = _flat_table(tensors)
    table_t = torch.cat([tensors[f"delta.{mid}"].T for mid in header["ids"]])
    prompts = ["In which city was Danielle Darrieux born?", edits[0].prompt, born.prompt, edits[2].prompt]
    routed, tokens = ed.routed, ed.tokens
    captured = {}
    hooks = [
        routed.register_forward_pre_hook(lambda _m, args: captured.__setitem__("a", args[0])),
        ed.layout.block.register_forward_pre_hook(
            lambda _m, args, kw: captured.__setitem__(
                "h", kw.get("hidden_states", args[0] if args else None)
            ),
            with_kwargs=True,
        ),
    ]
    try:
        xs, hs, want = [], [], []
        for p in prompts:
            ids = torch.tensor([tokens.prompt(p)])
            span = torch.ones_like(ids, dtype=torch.bool)
            with torch.no_grad(), routed.hold_route(), routed.query_span(span):
                ed.model(input_ids=ids, use_cache=False)
                a = captured["a"][0]
                xs.append(a)
                hs.append(captured["h"][0])
                with routed.main_only():
                    main = a @ routed.weight.T
                want.append(routed(a.unsqueeze(0))[0] - main)  # the prompt's route, held
    finally:
        for h in hooks:
            h.remove()
    choices = routed_choices(ed, prompts)
    ids_of = [e for m in live_memories(ed.routable()) for e in m.edit_ids]
    assert {ids_of[c] for c in choices[:3]} == {"e0", "e4"}  # the key chose between the subject's two edits
    lens = [x.shape[0] for x in xs]
    starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    flat_ids = torch.cat([torch.tensor(tokens.prompt(p)) for p in prompts])
    # vLLM hands the layer hidden_states and the residual it has not added yet: the module adds them back
    h = torch.cat(hs)
    deferred = torch.randn_like(h)
    mod = WiseRoutedProjection(routed.d_in, routed.d_out, torch.float32, "attn", layout="keyed")
    mod.block_parts = (h - deferred, deferred)
    last = mod._last_block_inputs(starts)
    torch.testing.assert_close(last, h[starts[1:] - 1], atol=1e-5, rtol=1e-5)
    got = keyed_flat(torch.cat(xs), flat_ids, starts, table, header["max_len"], table_t, None, None, last)
    torch.testing.assert_close(got, torch.cat(want), atol=1e-4, rtol=1e-4)


def _flat_table(tensors):
    """The routing table of a decoded package as the serving module installs it."""
    table = {k.removeprefix("routing."): v for k, v in tensors.items() if k.startswith("routing.")}
    return {
        **table,
        "columns": table["columns"].long(),
        "memory_of": table["memory_of"].long(),
        "subject_groups": table["subject_groups"].long(),
        "relkeys": table["relkeys"].float(),
        "projection": table["projection"].float(),
    }
