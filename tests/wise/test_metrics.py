import pytest
import torch

from wise.evaluate import TokenPredictions, agreement, mean, token_accuracy


def _preds(rows):
    return TokenPredictions(
        [torch.tensor(p) for p, _ in rows],
        [torch.tensor(g) for _, g in rows],
        torch.zeros(len(rows)),
        torch.zeros(len(rows)),
    )


def test_teacher_forced_token_accuracy_is_per_edit_fraction_of_target_tokens():
    preds = _preds([([5, 6, 7], [5, 6, 8]), ([1], [1]), ([2, 3], [4, 5])])
    assert token_accuracy(preds) == pytest.approx([2 / 3, 1.0, 0.0])
    assert mean(token_accuracy(preds)) == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)


def test_locality_is_agreement_with_pre_edit_argmax_not_with_gold():
    before = _preds([([9, 9], [1, 2]), ([3], [3])])  # the pre-edit model was wrong on row 0: irrelevant
    after = _preds([([9, 4], [1, 2]), ([3], [3])])
    assert agreement(after, before) == [0.5, 1.0]


def test_mean_of_nothing_is_none_not_zero():
    assert mean([]) is None


def _greedy_reference(model, routed, tokens, prompt, max_new_tokens, main_only=False):
    """Greedy decoding without a cache: the whole sequence again at every step, routed on the prompt's tokens."""
    prompt_ids = list(tokens.prompt(prompt))
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        inp = torch.tensor([ids])
        span = torch.zeros_like(inp, dtype=torch.bool)
        span[0, : len(prompt_ids)] = True
        with torch.no_grad(), routed.main_only() if main_only else routed.query_span(span):
            nxt = int(model(input_ids=inp, use_cache=False).logits[0, -1].argmax())
        if nxt == tokens.tokenizer.eos_token_id:
            break
        ids.append(nxt)
    return tokens.tokenizer.decode(ids[len(prompt_ids) :], skip_special_tokens=True)


def test_cached_greedy_generation_with_held_route_equals_full_recompute(
    tiny_model, tiny_tokenizer, edits, pool
):
    # greedy_generate decides the route at the prefill and decodes with a KV cache; it must produce exactly the
    # continuation of re-reading the whole sequence at every step with the prompt as the query span
    from wise.batch import Tokens
    from wise.evaluate import greedy_generate
    from wise.router import RoutedLinear

    mlp = tiny_model.model.layers[2].mlp
    routed = RoutedLinear(mlp.down_proj)
    mlp.down_proj = routed
    tokens = Tokens(tiny_tokenizer)
    prompts = [e.prompt for e in edits] + [p for p, _ in pool]
    torch.manual_seed(7)
    deltas = torch.randn(3, *routed.weight.shape) * 2.0
    routed.set_memories(deltas, torch.ones(3))
    scores = []
    for p in prompts:  # place thresholds so that about half of the prompts route to a side memory
        with torch.no_grad():
            tiny_model(input_ids=torch.tensor([list(tokens.prompt(p))]))
        scores.append(routed.last_ratio.item())
    routed.set_memories(deltas, torch.ones(3) * float(torch.tensor(scores).median()))
    routes, differs = [], 0
    for p in prompts:
        got = greedy_generate(tiny_model, routed, tokens, p, 6)
        routes.append(routed.last_choice.item())
        assert got == _greedy_reference(tiny_model, routed, tokens, p, 6), p
        main = greedy_generate(tiny_model, routed, tokens, p, 6, main_only=True)
        assert main == _greedy_reference(tiny_model, routed, tokens, p, 6, main_only=True), p
        differs += got != main
    assert min(routes) == -1 and max(routes) >= 0  # both kinds of route were exercised
    assert differs  # and the side memories change what is generated
    # batched (left-padded, routed per row at the prefill, held): the same continuations
    from wise.evaluate import greedy_generate_batch

    alone = [greedy_generate(tiny_model, routed, tokens, p, 6) for p in prompts]
    assert greedy_generate_batch(tiny_model, routed, tokens, prompts, [6] * len(prompts)) == alone


def test_evaluation_logs_each_pass_at_info_only_when_asked(tiny_model, tiny_tokenizer, edits, caplog):
    import logging

    from wise.batch import Tokens
    from wise.evaluate import evaluate_records
    from wise.router import RoutedLinear

    mlp = tiny_model.model.layers[2].mlp
    mlp.down_proj = routed = RoutedLinear(mlp.down_proj)
    tokens = Tokens(tiny_tokenizer)
    with caplog.at_level(logging.INFO, logger="wise.evaluate"):
        evaluate_records(tiny_model, routed, tokens, edits, generate=True)
        assert not caplog.records
        evaluate_records(tiny_model, routed, tokens, edits, generate=True, progress=True)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6, lines
    assert lines[0].startswith("edited model, 4 records: reliability (teacher-forced), 4 probes,")
    assert lines[1].startswith("edited model, 4 records: generalization (teacher-forced), 3 probes,")
    assert lines[-1].startswith("edited model, 4 records: generalization (generation), 3 probes,")


def test_evaluation_kept_in_slices_equals_one_pass_and_resumes_at_the_missing_slice(
    tiny_model, tiny_tokenizer, edits, tmp_path, monkeypatch
):
    import wise.evaluate as ev
    from wise.batch import Tokens
    from wise.router import RoutedLinear

    mlp = tiny_model.model.layers[2].mlp
    mlp.down_proj = routed = RoutedLinear(mlp.down_proj)
    tokens = Tokens(tiny_tokenizer)
    args = (tiny_model, routed, tokens, edits)
    whole = ev.evaluate_records(*args, generate=True)
    # slices of 3 records: the second starts after an edit without rephrases, so its owners are offset
    sliced = ev.evaluate_records(*args, generate=True, cache=tmp_path, chunk=3)
    assert sliced == whole
    first, second = sorted(tmp_path.iterdir())
    assert first.name.startswith("0-3-") and second.name.startswith("3-4-")
    # a stopped evaluation: the first slice is kept, only the second is measured again
    second.unlink()
    measured = []
    real = ev.probe_records

    def counting(model, routed, tokens, records, **kw):
        measured.append([r.id for r in records])
        return real(model, routed, tokens, records, **kw)

    monkeypatch.setattr(ev, "probe_records", counting)
    assert ev.evaluate_records(*args, generate=True, cache=tmp_path, chunk=3) == whole
    assert measured == [["e3"]]
    # a slice of other records is not mistaken for a kept one
    measured.clear()
    other = [edits[1], edits[0], edits[2], edits[3]]
    ev.evaluate_records(tiny_model, routed, tokens, other, generate=True, cache=tmp_path, chunk=3)
    assert measured == [["e1", "e0", "e2"]]
