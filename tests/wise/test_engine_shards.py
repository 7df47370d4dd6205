"""Several shards trained as one batched computation must equal independent single-shard optimisations."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from wise.batch import IGNORE, Batch, Tokens
from wise.engine import CachedEngine, EditResult, Margins, NaiveEngine, StepConfig
from wise.layout import ResolvedLayout, resolve_layout
from wise.masks import shard_mask

ENGINES = [CachedEngine, NaiveEngine]


@dataclass
class Shard:
    edits: list[tuple[str, str]]  # (prompt, target) edit rows
    irrelevant: list[tuple[str, str]]  # (prompt, answer) rows without labels
    shard_id: int
    anchors: tuple[torch.Tensor, torch.Tensor] | None = None


@pytest.fixture
def setup(tiny_model, tiny_tokenizer):
    tiny_model.requires_grad_(False)
    return tiny_model, resolve_layout(tiny_model, 2), Tokens(tiny_tokenizer)


def _cfg(layout: ResolvedLayout, n_iter: int = 8, early_stop_loss: float = 0.0) -> StepConfig:
    w = layout.module.weight
    scale = float(w.norm(dim=0).mean())  # rough size of the layer's output per unit input
    return StepConfig(1.0, n_iter, early_stop_loss, 0.5, Margins(0.3 * scale, scale, 0.5 * scale), "mean")


def _batch(tokens: Tokens, shards: list[Shard], order: list[int] | None = None) -> tuple[Batch, ...]:
    """Collate all shards' rows (in ``order``, default shard by shard): batch, is_edit, row_shard."""
    rows, flags, owner = [], [], []
    for s, sh in enumerate(shards):
        for pairs, flag in ((sh.edits, True), (sh.irrelevant, False)):
            rows += [tokens.row(p, t) for p, t in pairs]
            flags += [flag] * len(pairs)
            owner += [s] * len(pairs)
    order = list(range(len(rows))) if order is None else order
    batch = tokens.collate([rows[i] for i in order])
    is_edit = torch.tensor([flags[i] for i in order])
    batch.labels[~is_edit] = IGNORE
    return batch, is_edit, torch.tensor([owner[i] for i in order])


def _anchors(model, layout: ResolvedLayout, tokens: Tokens, prompts: list[str]):
    """Inputs of the edited projection over the prompts' tokens, padded: (K, P, d_in) and span (K, P)."""
    captured = {}
    hook = layout.module.register_forward_pre_hook(lambda _m, args: captured.__setitem__("a", args[0]))
    batch = tokens.collate([tokens.row(p, "x") for p in prompts])
    try:
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        hook.remove()
    return captured["a"].clone(), batch.span.clone()


def _mask(layout: ResolvedLayout, shard_id: int) -> torch.Tensor:
    return shard_mask(tuple(layout.module.weight.shape), 0.3, "random", seed=0, shard_id=shard_id)


def _alone(engine, tokens, layout, shards, deltas, cfg) -> list[EditResult]:
    """The oracle: one independent ``optimise`` per shard on its own batch."""
    out = []
    for sh, d in zip(shards, deltas, strict=True):
        batch, is_edit, _ = _batch(tokens, [sh])
        out.append(engine.optimise(batch, is_edit, d, _mask(layout, sh.shard_id), cfg, sh.anchors))
    return out


def _together(engine, tokens, layout, shards, deltas, cfg, order=None) -> tuple[list[EditResult], Batch, ...]:
    batch, is_edit, owner = _batch(tokens, shards, order)
    masks = [_mask(layout, sh.shard_id) for sh in shards]
    results = engine.optimise_shards(batch, is_edit, owner, deltas, masks, cfg, [sh.anchors for sh in shards])
    return results, batch, is_edit, owner


def _assert_same(
    got: EditResult,
    want: EditResult,
    d_got: torch.Tensor,
    d_want: torch.Tensor,
    edit_order: list[int] | None = None,
    irr_order: list[int] | None = None,
) -> None:
    """``got`` equals ``want``; ``*_order`` list, in ``got``'s batch order, the rows' positions in ``want``."""
    assert got.steps == want.steps
    assert got.loss == pytest.approx(want.loss, rel=1e-4, abs=1e-5)
    assert got.ce_loss == pytest.approx(want.ce_loss, rel=1e-4, abs=1e-5)
    assert got.margin_loss == pytest.approx(want.margin_loss, rel=1e-4, abs=1e-5)
    scale = float(d_want.abs().max())
    assert scale > 0  # the shard did learn something, so the comparison means something
    torch.testing.assert_close(d_got, d_want, rtol=1e-4, atol=1e-5 * scale)
    d_edit, d_irr = want.edit_activation, want.irrelevant_activation
    d_edit = d_edit if edit_order is None else d_edit[edit_order]
    d_irr = d_irr if irr_order is None else d_irr[irr_order]
    torch.testing.assert_close(got.edit_activation, d_edit, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.irrelevant_activation, d_irr, rtol=1e-4, atol=1e-5)


def _three_shards(model, layout, tokens, edits, pool) -> list[Shard]:
    return [
        Shard([(edits[0].prompt, edits[0].target), (edits[0].rephrase[0], edits[0].target)], pool[:2], 0),
        Shard(
            [(edits[1].prompt, edits[1].target)],
            pool[2:3],
            1,
            _anchors(model, layout, tokens, [edits[3].prompt, pool[3][0]]),
        ),
        # no irrelevant rows at all: only the in-scope margin term
        Shard(
            [(edits[2].prompt, edits[2].target)], [], 2, _anchors(model, layout, tokens, [edits[3].prompt])
        ),
    ]


@pytest.mark.parametrize("engine_cls", ENGINES, ids=lambda c: c.__name__)
def test_shards_together_equal_shards_alone(engine_cls, setup, edits, pool):
    """Three shards (two edits / one with anchors / one with anchors and no irrelevant rows), rows interleaved,
    stopping at different steps: each equals its own ``optimise`` on its own batch."""
    model, layout, tokens = setup
    engine = engine_cls(model, layout)
    shards = _three_shards(model, layout, tokens, edits, pool)
    cfg = _cfg(layout, n_iter=8, early_stop_loss=1.5)
    zeros = [torch.zeros_like(layout.module.weight) for _ in shards]
    alone_d = [z.clone() for z in zeros]
    alone = _alone(engine, tokens, layout, shards, alone_d, cfg)
    assert len({r.steps for r in alone}) > 1, "settings should make the shards stop at different steps"
    together_d = [z.clone() for z in zeros]
    order = [3, 0, 6, 2, 5, 1, 4]  # the shards' rows interleaved, and not in their own order
    results, batch, is_edit, owner = _together(engine, tokens, layout, shards, together_d, cfg, order)
    assert len(results) == 3
    start = [0, 4, 6]  # first row of each shard before interleaving
    local = [i - start[int(s)] for i, s in zip(order, owner, strict=True)]  # row's index in its own batch
    for s, sh in enumerate(shards):
        mine = [j for j, o in zip(local, owner.tolist(), strict=True) if o == s]
        n_edit = len(sh.edits)
        edit_order = [j for j in mine if j < n_edit]
        irr_order = [j - n_edit for j in mine if j >= n_edit]
        _assert_same(results[s], alone[s], together_d[s], alone_d[s], edit_order, irr_order)
        # the masks kept each shard to its own entries
        assert ((together_d[s] != 0) & ~_mask(layout, sh.shard_id)).sum() == 0
    # prompt activations cover the whole batch; a row's activations equal those in its shard's own batch
    acts = results[0].prompt_activations
    assert acts.shape[:2] == batch.input_ids.shape
    assert all(r.prompt_activations is acts for r in results)
    for g, (j, s) in enumerate(zip(local, owner.tolist(), strict=True)):
        own = _batch(tokens, [shards[s]])[0]
        torch.testing.assert_close(
            acts[g][batch.span[g]], alone[s].prompt_activations[j][own.span[j]], rtol=1e-4, atol=1e-5
        )
    assert results[2].irrelevant_activation.shape == (0,)
    assert results[0].irrelevant_activation.shape == (2,) and results[0].edit_activation.shape == (2,)


@pytest.mark.parametrize("engine_cls", ENGINES, ids=lambda c: c.__name__)
def test_early_stop_is_per_shard(engine_cls, setup, edits, pool):
    model, layout, tokens = setup
    engine = engine_cls(model, layout)
    shards = [
        Shard([(edits[0].prompt, edits[0].target)], pool[:1], 0),
        Shard([(edits[1].prompt, edits[1].target)], pool[1:2], 1),
    ]
    # shard 0 has already learnt its edit (as after replaying it), shard 1 starts from the main memory
    trained = torch.zeros_like(layout.module.weight)
    _alone(engine, tokens, layout, shards[:1], [trained], _cfg(layout, n_iter=10))
    cfg = _cfg(layout, n_iter=25, early_stop_loss=0.3)
    deltas = [trained.clone(), torch.zeros_like(trained)]
    results, *_ = _together(engine, tokens, layout, shards, deltas, cfg)
    early, late = results
    assert early.loss < cfg.early_stop_loss and (late.loss < cfg.early_stop_loss or late.steps == cfg.n_iter)
    assert 1 < early.steps < late.steps  # shard 0 trained a little, then stopped while shard 1 went on
    # the stopped shard took exactly early.steps - 1 updates (none at its stop step, none afterwards)
    replay = trained.clone()
    _alone(engine, tokens, layout, shards[:1], [replay], _cfg(layout, n_iter=early.steps - 1))
    assert not torch.equal(replay, trained)
    torch.testing.assert_close(deltas[0], replay, rtol=1e-4, atol=1e-5 * float(replay.abs().max()))
    # ... while the other kept training: it equals its own run, which went on for more steps
    alone_late = torch.zeros_like(trained)
    want = _alone(engine, tokens, layout, shards[1:], [alone_late], cfg)[0]
    _assert_same(late, want, deltas[1], alone_late)
    assert not torch.equal(deltas[1], torch.zeros_like(trained))


def test_cached_and_naive_agree_on_shards(setup, edits, pool):
    model, layout, tokens = setup
    shards = _three_shards(model, layout, tokens, edits, pool)
    cfg = _cfg(layout, n_iter=6, early_stop_loss=1.5)
    out = {}
    for cls in ENGINES:
        deltas = [torch.zeros_like(layout.module.weight) for _ in shards]
        out[cls] = (_together(cls(model, layout), tokens, layout, shards, deltas, cfg)[0], deltas)
    (rc, dc), (rn, dn) = out[CachedEngine], out[NaiveEngine]
    for s in range(len(shards)):
        _assert_same(rc[s], rn[s], dc[s], dn[s])


def test_bad_shard_assignment_is_rejected(setup, edits, pool):
    model, layout, tokens = setup
    engine = CachedEngine(model, layout)
    shards = [Shard([(edits[0].prompt, edits[0].target)], [], 0), Shard([], pool[:1], 1)]
    batch, is_edit, owner = _batch(tokens, shards)
    deltas = [torch.zeros_like(layout.module.weight) for _ in shards]
    masks = [_mask(layout, s) for s in range(2)]
    with pytest.raises(ValueError, match="shard 1 has no edit row"):
        engine.optimise_shards(batch, is_edit, owner, deltas, masks, _cfg(layout), [None, None])
    with pytest.raises(ValueError, match=r"row_shard in \[0, 1\)"):
        engine.optimise_shards(batch, is_edit, owner, deltas[:1], masks[:1], _cfg(layout), [None])
    assert all(not d.any() for d in deltas)
