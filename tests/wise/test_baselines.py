"""FT-L and GRACE on a tiny random Llama: an edit is learned, the pre-edit layer stays available, GRACE leaves
unrelated inputs exactly as they were, the codebook follows GRACE's expand/split rules, states round-trip."""

import copy
from dataclasses import dataclass

import pytest
import torch

from wise.baselines import FTLConfig, FTLEditor, GraceConfig, GraceEditor
from wise.evaluate import answer_predictions, evaluate_records
from wise.state import StateError


def _logits(model, tokenizer, text):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _ftl_cfg(**kw):
    return FTLConfig(**{"layer": 2, "lr": 0.02, "n_iter": 30, "norm_constraint": 0.1, **kw})


def test_ftl_learns_an_edit_within_its_bound_and_keeps_the_pre_edit_weight(tiny_model, tiny_tokenizer, edits):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    ed = FTLEditor(tiny_model, tiny_tokenizer, _ftl_cfg())
    pre = evaluate_records(tiny_model, ed.routed, ed.tokens, edits[:1], main_only=True, generate=False)
    out = ed.apply(edits[:1])
    assert out[0].steps == 30 and ed.n_edits == 1 and ed.applied_ids() == ["e0"]
    post = evaluate_records(tiny_model, ed.routed, ed.tokens, edits[:1], generate=False)
    assert pre["teacher_forced"]["reliability"] < 1.0
    assert post["teacher_forced"]["reliability"] == 1.0
    delta = ed.routed.delta
    assert delta.abs().max() <= 0.1 + 1e-7 and delta.abs().max() > 0
    # W_0 itself never changes: main_only() reproduces the pre-edit model exactly
    assert torch.equal(ed.routed.weight, before["model.layers.2.mlp.down_proj.weight"])
    again = evaluate_records(tiny_model, ed.routed, ed.tokens, edits[:1], main_only=True, generate=False)
    assert again["per_edit"] == pre["per_edit"]


def test_ftl_norm_bound_is_over_all_edits(tiny_model, tiny_tokenizer, edits):
    ed = FTLEditor(tiny_model, tiny_tokenizer, _ftl_cfg(norm_constraint=0.01, lr=0.05))
    ed.apply(edits)
    assert float(ed.routed.delta.abs().max()) == pytest.approx(0.01)


def test_ftl_state_round_trip_and_refusal(tiny_model, tiny_tokenizer, edits, tmp_path):
    other = copy.deepcopy(tiny_model)
    ed = FTLEditor(tiny_model, tiny_tokenizer, _ftl_cfg(n_iter=5))
    ed.apply(edits[:2])
    ed.save(tmp_path / "s")
    fresh = FTLEditor(other, tiny_tokenizer, _ftl_cfg(n_iter=5))
    fresh.load(tmp_path / "s")
    assert fresh.applied_ids() == ["e0", "e1"] and torch.equal(fresh.routed.delta, ed.routed.delta)
    assert torch.equal(_logits(other, tiny_tokenizer, "Toko"), _logits(tiny_model, tiny_tokenizer, "Toko"))
    with pytest.raises(StateError, match="n_iter"):
        FTLEditor(copy.deepcopy(other), tiny_tokenizer, _ftl_cfg(n_iter=6)).load(tmp_path / "s")


@dataclass(frozen=True)
class Edit:
    id: str
    prompt: str
    target: str


def _grace_cfg(**kw):
    return GraceConfig(
        **{"layer": 2, "eps_init": 1e-3, "eps_scale": "absolute", "lr": 0.5, "n_iter": 60, **kw}
    )


def test_grace_learns_an_edit_and_leaves_unrelated_inputs_untouched(tiny_model, tiny_tokenizer):
    # single-token targets: one value vector, one layer above it in this tiny model
    edits = [
        Edit("g0", "The mother tongue of Danielle Darrieux is", "piano"),
        Edit("g1", "The official religion of Edwin of Northumbria is", "Paris"),
    ]
    unrelated = "Where is the Eiffel Tower? In Paris"
    ref = _logits(tiny_model, tiny_tokenizer, unrelated)
    ed = GraceEditor(tiny_model, tiny_tokenizer, _grace_cfg())
    pre = evaluate_records(tiny_model, ed.routed, ed.tokens, edits, main_only=True, generate=False)
    out = ed.apply(edits)
    assert all(o.steps > 0 for o in out) and ed.routed.keys.shape[0] == 2
    post = evaluate_records(tiny_model, ed.routed, ed.tokens, edits, generate=True)
    assert pre["teacher_forced"]["reliability"] == 0.0
    assert post["teacher_forced"]["reliability"] == 1.0 and post["generate"]["reliability"] == 1.0
    assert post["routed_fraction"]["edit"] == 1.0
    # outside every deferral radius the layer is the unedited one, bit for bit
    with ed.routed.query_span(None):
        assert torch.equal(_logits(tiny_model, tiny_tokenizer, unrelated), ref)
    assert ed.routed.last_choice.tolist() == [-1]


def test_grace_key_is_the_last_prompt_token(tiny_model, tiny_tokenizer, edits):
    ed = GraceEditor(tiny_model, tiny_tokenizer, _grace_cfg())
    ed.apply(edits[:1])
    # teacher forcing appends the target: the key must not move with it, so the edit is still found
    preds = answer_predictions(tiny_model, ed.routed, ed.tokens, [(edits[0].prompt, edits[0].target)])
    assert preds.route.tolist() == [0]
    keys = ed.prompt_keys([edits[0].prompt, edits[0].prompt + " " + edits[0].target])
    # the same prompt alone and in a padded batch of two: equal up to float32 reduction order
    assert torch.allclose(keys[0], ed.routed.keys[0], rtol=1e-4, atol=1e-5), (
        (keys[0] - ed.routed.keys[0]).abs().max()
    )
    assert (keys[1] - keys[0]).abs().max() > 1e-2


@pytest.mark.parametrize("second_target", ["Paris", "Tokyo"])
def test_grace_codebook_expands_for_the_same_label_and_splits_for_another(
    tiny_model, tiny_tokenizer, second_target
):
    first, second = "The capital of France is", "The capital of Italy is"
    probe = GraceEditor(copy.deepcopy(tiny_model), tiny_tokenizer, _grace_cfg())
    keys = probe.prompt_keys([first, second])
    d = float((keys[0] - keys[1]).norm())
    # eps_init = 0.75 d: the second key lies outside the first ball but within eps_init + radius of its key
    ed = GraceEditor(tiny_model, tiny_tokenizer, _grace_cfg(eps_init=0.75 * d, n_iter=5))
    ed.apply([Edit("a", first, "Paris")])
    out = ed.apply([Edit("b", second, second_target)])
    radii = ed.routed.radii.tolist()
    if second_target == "Paris":  # same label: the entry grows to cover the new key, nothing is trained
        assert out[0].steps == 0 and ed.labels == ["Paris"] and radii == pytest.approx([d], rel=1e-4)
    else:  # conflict: both entries keep half the distance, the new one gets its own value
        assert out[0].steps > 0 and ed.labels == ["Paris", "Tokyo"]
        assert radii == pytest.approx([d / 2, d / 2], rel=1e-4)
    assert ed.applied_ids() == ["a", "b"]


def test_grace_state_round_trip(tiny_model, tiny_tokenizer, edits, tmp_path):
    other = copy.deepcopy(tiny_model)
    ed = GraceEditor(tiny_model, tiny_tokenizer, _grace_cfg(n_iter=10))
    ed.apply(edits[:3])
    ed.save(tmp_path / "g")
    fresh = GraceEditor(other, tiny_tokenizer, _grace_cfg(n_iter=10))
    fresh.load(tmp_path / "g")
    a = evaluate_records(tiny_model, ed.routed, ed.tokens, edits[:3], generate=False)
    b = evaluate_records(other, fresh.routed, fresh.tokens, edits[:3], generate=False)
    assert a["per_edit"] == b["per_edit"] and fresh.labels == ed.labels


@pytest.mark.parametrize("kind", ["ft-l", "grace"])
def test_prefix_loss_equals_the_full_forward_loss(tiny_model, tiny_tokenizer, edits, kind):
    from wise.baselines.base import PrefixLoss, target_loss
    from wise.baselines.grace import last_span_index

    pair = [(edits[0].prompt, edits[0].target)]
    if kind == "ft-l":
        ed = FTLEditor(tiny_model, tiny_tokenizer, _ftl_cfg())
        ed.routed.delta.data.normal_(0, 0.05)
        objective = PrefixLoss(tiny_model, ed.layout, ed.tokens, pair)
        cached = objective(objective.a @ ed.routed.delta.T)
        full = target_loss(tiny_model, ed.tokens, pair, ed.routed.query_span)
    else:
        ed = GraceEditor(tiny_model, tiny_tokenizer, _grace_cfg())
        value = torch.randn(ed.routed.weight.shape[0])
        objective = PrefixLoss(tiny_model, ed.layout, ed.tokens, pair)
        main = ed.routed.main_output(objective.a)
        pos = torch.arange(main.shape[1]).unsqueeze(0) >= last_span_index(objective.batch.span).unsqueeze(1)
        cached = objective(torch.where(pos.unsqueeze(-1), value - main, torch.zeros_like(main)))
        with ed.routed.training_value(value):
            full = target_loss(tiny_model, ed.tokens, pair, ed.routed.query_span)
    assert float(cached) == pytest.approx(float(full), rel=1e-5)
    assert float(full) > 0.1  # a loss the edit has to move, not a trivial zero
