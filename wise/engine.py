"""The WISE edit optimisation (paper Sec. 2.3, Eq. 5), in two interchangeable implementations.

``CachedEngine`` runs the frozen part of the network once per edit: the blocks below the edited layer never
change, and the edited block's output with the main memory (``o0``) plus the side memory's contribution
``Delta a`` is the block's output with the side memory. Each iteration then runs only the blocks above, the
final norm, and the LM head at the label positions. ``NaiveEngine`` recomputes the whole forward pass and the
full-vocabulary logits at every iteration, as the reference implementation does; it exists for the speed
benchmark and as an oracle for the cached engine.

Both minimise  CE(target | prompt, templates) + L_a  with
    L_a = ReLU(d_irr - alpha) + ReLU(beta - d_edit) + ReLU(gamma - (d_edit - d_irr))
over the side memory's task vector ``Delta`` by masked SGD with the element-wise norm constraint.

Several shards (each its own ``Delta``, mask and rows) train as one batched computation: every row sees only
its own shard's ``Delta``, the loss is the sum of the shards' losses (so each ``Delta`` gets exactly its own
gradient, as rows never interact), and early stopping is per shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wise.batch import IGNORE, Batch
from wise.layout import ResolvedLayout
from wise.router import reduce_span


@dataclass(frozen=True)
class Margins:
    """Effective margins (already scaled to the model's activation size)."""

    alpha: float
    beta: float
    gamma: float


@dataclass(frozen=True)
class StepConfig:
    lr: float
    n_iter: int
    early_stop_loss: float
    norm_constraint: float
    margins: Margins
    reduce: str


@dataclass
class EditResult:
    """What one optimisation did: steps run, final losses, and the edit rows' final activations."""

    steps: int
    loss: float
    ce_loss: float
    margin_loss: float
    edit_activation: torch.Tensor  # (E,) routing scores of the edit rows at the end
    irrelevant_activation: torch.Tensor  # (I,)
    prompt_activations: torch.Tensor  # (B, T, d_in) inputs of the edited projection (for routing keys)


def margin_loss(d_edit: torch.Tensor, d_irr: torch.Tensor, m: Margins) -> torch.Tensor:
    """Paper Eq. 5 activation-margin loss.

    Args:
        d_edit: (E,) routing activations of the edit rows.
        d_irr: (I,) routing activations of the irrelevant rows (I may be 0).
        m: margins.

    Returns:
        Scalar loss.
    """
    loss = F.relu(m.beta - d_edit).mean()
    if d_irr.numel():
        loss = loss + F.relu(d_irr - m.alpha).mean()
        loss = loss + F.relu(m.gamma - (d_edit.unsqueeze(1) - d_irr.unsqueeze(0))).mean()  # (E, I) pairs
    return loss


def _sgd_step(delta: torch.Tensor, mask: torch.Tensor, lr: float, bound: float) -> None:
    with torch.no_grad():
        delta -= lr * delta.grad * mask
        delta.clamp_(-bound, bound)
        delta.grad = None


def _project(a: torch.Tensor, delta: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Side-memory output ``Delta a``: (..., T, d_in) -> (..., T, d_out)."""
    return a @ delta if transposed else a @ delta.T


def _scores(side: torch.Tensor, span: torch.Tensor, reduce: str) -> torch.Tensor:
    """Routing scores (n,) of rows from their side outputs (n, T, d_out), reduced over the span (n, T)."""
    return reduce_span(side.float().norm(dim=-1), span, reduce)


@dataclass
class _Plan:
    """Which batch rows belong to which shard.

    A shard's rows are listed edit rows first, then irrelevant rows, each group in batch order: its edit rows'
    scores are then a prefix of its scores, and no per-step gather is needed to split them.
    """

    rows: list[torch.Tensor]  # per shard (n_s,) batch row indices
    n_edit: list[int]  # per shard: how many of its rows are edit rows
    inverse: torch.Tensor  # (B,) position of each batch row in cat(rows)

    @classmethod
    def build(cls, batch: Batch, is_edit: torch.Tensor, row_shard: torch.Tensor, n_shards: int) -> _Plan:
        b, flags, owner = batch.input_ids.shape[0], is_edit.tolist(), row_shard.tolist()  # one-off host syncs
        labelled = (batch.labels != IGNORE).any(-1).tolist()
        if not len(flags) == len(owner) == b or any(not 0 <= o < n_shards for o in owner):
            raise ValueError(
                f"is_edit and row_shard need one entry per row ({b}), row_shard in [0, {n_shards})"
            )
        rows, n_edit = [], []
        for s in range(n_shards):
            edit = [i for i in range(b) if owner[i] == s and flags[i]]
            if not any(labelled[i] for i in edit):
                raise ValueError(f"shard {s} has no edit row with label tokens; every shard needs one")
            irr = [i for i in range(b) if owner[i] == s and not flags[i]]
            rows.append(torch.tensor(edit + irr, dtype=torch.long, device=is_edit.device))
            n_edit.append(len(edit))
        inverse = torch.empty(b, dtype=torch.long, device=is_edit.device)
        inverse[torch.cat(rows)] = torch.arange(b, device=is_edit.device)
        return cls(rows, n_edit, inverse)


class _Engine:
    """Shared optimisation loop; subclasses say how the loss is computed."""

    def __init__(self, model: nn.Module, layout: ResolvedLayout) -> None:
        self.model = model
        self.layout = layout
        self.transposed = layout.layout.transposed

    def _prepare(self, batch: Batch, plan: _Plan) -> object:
        raise NotImplementedError

    def _select(self, state: object, active: list[int]) -> None:
        """Restrict the per-iteration work to the shards still training (called whenever that set changes)."""

    def _forward(
        self, state: object, batch: Batch, deltas: Sequence[torch.Tensor], active: list[int], reduce: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return, for the active shards, the CE losses (n_active,) and each one's row scores (n_s,)."""
        raise NotImplementedError

    def _activations(self, state: object) -> torch.Tensor:
        raise NotImplementedError

    def optimise(
        self,
        batch: Batch,
        is_edit: torch.Tensor,
        delta: torch.Tensor,
        mask: torch.Tensor,
        cfg: StepConfig,
        anchors: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> EditResult:
        """Train one ``delta`` in place on one batch: :meth:`optimise_shards` with one shard (S=1).

        Args:
            batch, is_edit, cfg: as in :meth:`optimise_shards`.
            delta, mask, anchors: the shard's task vector (updated in place), gradient mask and anchors.

        Returns:
            The :class:`EditResult`.
        """
        owner = torch.zeros(is_edit.shape, dtype=torch.long, device=is_edit.device)
        return self.optimise_shards(batch, is_edit, owner, [delta], [mask], cfg, [anchors])[0]

    def optimise_shards(
        self,
        batch: Batch,
        is_edit: torch.Tensor,
        row_shard: torch.Tensor,
        deltas: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        cfg: StepConfig,
        anchors: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    ) -> list[EditResult]:
        """Train S shards' task vectors in place on one batch, as S independent optimisations run together.

        Shard s's rows see only ``deltas[s]``; its loss is the CE over its label tokens plus the margin loss of
        its edit rows (and anchors) against its irrelevant rows. The sum over the shards still training is
        backpropagated, so each ``delta`` gets exactly its own gradient. A shard stops (no update at that step,
        never updated again) once its loss falls below ``cfg.early_stop_loss``; the rest go on.

        Args:
            batch: all shards' rows, in any order: edit rows (label tokens set) and irrelevant rows (no labels).
            is_edit: (B,) bool, True for edit rows.
            row_shard: (B,) long in [0, S), the shard of each row.
            deltas: S side-memory task vectors (d_out, d_in) ((d_in, d_out) when transposed); updated in place.
            masks: S bool gradient masks, same shapes as ``deltas``.
            cfg: step settings, shared by all shards.
            anchors: per shard, None or ``(a, span)`` of shapes (K, P, d_in) / (K, P): prompt activations of
                edits already in that shard. They join the in-scope side of its margin loss, so that training
                a new edit does not pull earlier edits' routing activations below the threshold. They need no
                forward pass: they live at the edited layer.

        Returns:
            One :class:`EditResult` per shard; ``prompt_activations`` is the whole batch's (B, T, d_in).

        Raises:
            ValueError: mismatching lengths, row_shard out of range, a shard without labelled edit rows.
        """
        n = len(deltas)
        anchors = [None] * n if anchors is None else list(anchors)
        if not len(masks) == len(anchors) == n or cfg.n_iter < 1:
            raise ValueError(f"need one mask and anchor per delta ({n}) and n_iter >= 1 (got {cfg.n_iter})")
        plan = _Plan.build(batch, is_edit, row_shard, n)
        state = self._prepare(batch, plan)
        maskf = [m.to(d.dtype) for m, d in zip(masks, deltas, strict=True)]
        steps = [0] * n
        losses = [(float("nan"),) * 3] * n  # per shard (total, ce, margin) at its last step
        active = list(range(n))  # shards still training
        self._select(state, active)
        for d in deltas:
            d.requires_grad_(True)
        try:
            for step in range(1, cfg.n_iter + 1):
                ce_t, scores = self._forward(state, batch, deltas, active, cfg.reduce)
                ml_t = torch.stack(
                    [self._margin(scores[i], s, plan, deltas, anchors, cfg) for i, s in enumerate(active)]
                )
                total_t = ce_t + ml_t  # (n_active,)
                values = torch.stack([total_t, ce_t, ml_t]).T.tolist()  # the one host sync per step
                keep = [not v[0] < cfg.early_stop_loss for v in values]
                for s, v in zip(active, values, strict=True):
                    steps[s], losses[s] = step, tuple(v)
                if any(keep):  # integer (not boolean) indexing: no host sync
                    total_t[[i for i, k in enumerate(keep) if k]].sum().backward()
                for s, k in zip(active, keep, strict=True):
                    if k:
                        _sgd_step(deltas[s], maskf[s], cfg.lr, cfg.norm_constraint)
                    else:  # stopped at this step, without an update: out of all later graphs
                        deltas[s].requires_grad_(False)
                        deltas[s].grad = None
                if not all(keep):
                    active = [s for s, k in zip(active, keep, strict=True) if k]
                    if not active:
                        break
                    self._select(state, active)
        finally:
            for d in deltas:
                d.requires_grad_(False)
                d.grad = None
        a = self._activations(state)  # (B, T, d_in)
        results = []
        with torch.no_grad():
            for s, (rows, ne) in enumerate(zip(plan.rows, plan.n_edit, strict=True)):
                sc = _scores(_project(a[rows], deltas[s], self.transposed), batch.span[rows], cfg.reduce)
                results.append(EditResult(steps[s], *losses[s], sc[:ne], sc[ne:], a))
        return results

    def _margin(
        self, scores: torch.Tensor, s: int, plan: _Plan, deltas, anchors, cfg: StepConfig
    ) -> torch.Tensor:
        """Margin loss of shard ``s`` from its row scores (n_s,), edit rows first, and its anchors."""
        d_edit = scores[: plan.n_edit[s]]
        if anchors[s] is not None:
            side = _project(anchors[s][0], deltas[s], self.transposed)  # (K, P, d_out)
            d_edit = torch.cat([d_edit, _scores(side, anchors[s][1], cfg.reduce)])
        return margin_loss(d_edit, scores[plan.n_edit[s] :], cfg.margins)


@dataclass
class _Selection:
    """The per-iteration inputs for the shards still training."""

    active: list[int]
    o0: torch.Tensor  # (E, T, d_model) edited block's output (main memory) on their edit rows
    upper: list[tuple[nn.Module, tuple, dict]]  # blocks above, their per-row arguments cut to those rows
    label_rows: torch.Tensor  # (N,) index among those edit rows of each label position
    label_cols: torch.Tensor  # (N,) column index
    label_ids: torch.Tensor  # (N,)
    label_group: torch.Tensor  # (N,) index into ``active`` of each label position
    n_labels: torch.Tensor  # (n_active,) label tokens per shard


@dataclass
class _Frozen:
    plan: _Plan
    a: torch.Tensor  # (B, T, d_in) input of the edited projection
    a_parts: list[torch.Tensor]  # per shard (n_s, T, d_in), rows in plan order
    span_parts: list[torch.Tensor]  # per shard (n_s, T)
    o0: torch.Tensor  # (B, T, d_model) edited block's output with the main memory
    upper: list[tuple[nn.Module, tuple, dict]]  # blocks above, with the extra args they were called with
    labels: torch.Tensor  # (B, T)
    sel: _Selection | None = None


class CachedEngine(_Engine):
    """Runs the frozen prefix once per edit and only the layers above the edited one per iteration."""

    def _prepare(self, batch: Batch, plan: _Plan) -> _Frozen:
        lay = self.layout
        captured: dict[str, object] = {}
        upper: list[tuple[nn.Module, tuple, dict]] = []
        hooks = [
            lay.module.register_forward_pre_hook(lambda _m, args: captured.__setitem__("a", args[0])),
            lay.block.register_forward_hook(lambda _m, _a, out: captured.__setitem__("o0", out)),
        ]
        for blk in list(lay.blocks)[lay.layer + 1 :]:

            def grab(m, args, kwargs, blk=blk):
                upper.append((blk, tuple(args[1:]), dict(kwargs)))

            hooks.append(blk.register_forward_pre_hook(grab, with_kwargs=True))
        try:
            with torch.no_grad(), _main_only(lay.module):
                self.model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    use_cache=False,
                    logits_to_keep=1,
                )
        finally:
            for h in hooks:
                h.remove()
        o0 = captured["o0"]
        o0 = (o0[0] if isinstance(o0, tuple) else o0).detach()
        a = captured["a"].detach()
        a_parts, span_parts = [a[r] for r in plan.rows], [batch.span[r] for r in plan.rows]
        return _Frozen(plan, a, a_parts, span_parts, o0, upper, batch.labels)

    def _select(self, st: _Frozen, active: list[int]) -> None:
        plan = st.plan
        edit_rows = torch.cat([plan.rows[s][: plan.n_edit[s]] for s in active])  # (E,) shard by shard
        group = torch.cat([torch.full_like(plan.rows[s][: plan.n_edit[s]], i) for i, s in enumerate(active)])
        labels = st.labels[edit_rows]
        rows, cols = (labels != IGNORE).nonzero(as_tuple=True)
        label_group = group[rows]  # (N,) index into ``active``
        # The blocks above were called on the whole batch; keep their per-row arguments for these edit rows:
        # irrelevant rows and stopped shards never enter the upper blocks.
        b = st.a.shape[0]
        upper = [
            (blk, _rows(args, edit_rows, b), {k: _rows(v, edit_rows, b) for k, v in kw.items()})
            for blk, args, kw in st.upper
        ]
        n_labels = torch.bincount(label_group, minlength=len(active)).float()
        st.sel = _Selection(
            active, st.o0[edit_rows], upper, rows, cols, labels[rows, cols], label_group, n_labels
        )

    def _forward(
        self, st: _Frozen, batch: Batch, deltas: Sequence[torch.Tensor], active: list[int], reduce: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        sel = st.sel
        assert sel is not None and sel.active == active
        # one matmul per shard on its own rows; no per-row copy of the task vectors
        sides = [_project(st.a_parts[s], deltas[s], self.transposed) for s in active]  # (n_s, T, d_out)
        edit_side = torch.cat([side[: st.plan.n_edit[s]] for s, side in zip(active, sides, strict=True)])
        tok = self.label_loss(st, edit_side)  # (N,)
        ce = tok.new_zeros(len(active)).index_add_(0, sel.label_group, tok) / sel.n_labels  # (n_active,)
        scores = [_scores(side, st.span_parts[s], reduce) for s, side in zip(active, sides, strict=True)]
        return ce, scores

    def _activations(self, st: _Frozen) -> torch.Tensor:
        return st.a

    def label_loss(self, st: _Frozen, extra: torch.Tensor) -> torch.Tensor:
        """Per label token CE when ``extra`` (E, T, d_out) is added to the edited projection's output of the
        selected edit rows: only the blocks above run. Returns (N,) losses."""
        sel = st.sel
        assert sel is not None
        h = sel.o0 + extra  # (E, T, d_model): only edit rows need the layers above
        for blk, args, kwargs in sel.upper:
            if "hidden_states" in kwargs:
                out = blk(*args, **{**kwargs, "hidden_states": h})
            else:
                out = blk(h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        h = self.layout.final_norm(h[sel.label_rows, sel.label_cols])  # (N, d_model): label positions only
        logits = self.layout.lm_head(h).float()  # (N, V)
        return F.cross_entropy(logits, sel.label_ids, reduction="none")

    def frozen_prefix(
        self, batch: Batch, row_shard: torch.Tensor | None = None, n_shards: int = 1
    ) -> _Frozen:
        """Run the frozen network once for a batch of edit rows (all rows trained; ``row_shard`` (B,) groups
        them, default one group): then :meth:`label_loss` costs only the blocks above the edited one. Used by
        the keyed layout and the baseline editors; :meth:`select` picks the groups still training."""
        n = batch.input_ids.shape[0]
        device = batch.input_ids.device
        owner = torch.zeros(n, dtype=torch.long) if row_shard is None else row_shard
        plan = _Plan.build(batch, torch.ones(n, dtype=torch.bool, device=device), owner, n_shards)
        st = self._prepare(batch, plan)
        self._select(st, list(range(n_shards)))
        return st

    def select(self, st: _Frozen, active: list[int]) -> None:
        """Restrict :meth:`label_loss` to the edit rows of the groups in ``active`` (in that order)."""
        self._select(st, active)


@dataclass
class _Live:
    plan: _Plan
    a: torch.Tensor | None = None  # (B, T, d_in) captured by the latest forward
    sides: list[torch.Tensor] | None = None  # per shard (n_s, T, d_out) side outputs of the latest forward


class NaiveEngine(_Engine):
    """Full forward pass and full-vocabulary logits at every iteration (the reference's cost profile)."""

    def _prepare(self, batch: Batch, plan: _Plan) -> _Live:
        return _Live(plan)

    def _forward(
        self, st: _Live, batch: Batch, deltas: Sequence[torch.Tensor], active: list[int], reduce: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        plan = st.plan

        def add_side(_m, args, out):
            st.a = args[0]
            # stopped shards' rows keep their (frozen) side memory; they no longer enter the loss
            st.sides = [
                _project(args[0][r], d, self.transposed) for r, d in zip(plan.rows, deltas, strict=True)
            ]
            return out + torch.cat(st.sides)[plan.inverse]  # (B, T, d_out), back in batch order

        hook = self.layout.module.register_forward_hook(add_side)
        try:
            with _main_only(self.layout.module):
                logits = self.model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).logits.float()  # (B, T, V)
        finally:
            hook.remove()
        tok = F.cross_entropy(
            logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE, reduction="none"
        ).view(batch.labels.shape)  # (B, T), 0 off the label positions
        row_ce, row_n = tok.sum(-1), (batch.labels != IGNORE).sum(-1)  # (B,)
        ce = torch.stack([row_ce[plan.rows[s]].sum() / row_n[plan.rows[s]].sum() for s in active])
        scores = [_scores(st.sides[s], batch.span[plan.rows[s]], reduce) for s in active]
        return ce, scores

    def _activations(self, st: _Live) -> torch.Tensor:
        assert st.a is not None
        return st.a.detach()


def _rows(value: object, rows: torch.Tensor, batch: int) -> object:
    """Select ``rows`` from per-row tensors (batch-first) inside a block's call arguments."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch and batch > 1:
        return value[rows]
    if isinstance(value, tuple):
        return tuple(_rows(v, rows, batch) for v in value)
    return value


@contextlib.contextmanager
def _main_only(module: nn.Module) -> Iterator[None]:
    """Silence the router while training: the side memory under training is added explicitly."""
    ctx = getattr(module, "main_only", None)
    with ctx() if ctx is not None else contextlib.nullcontext():
        yield


ENGINES: dict[str, type[_Engine]] = {"cached": CachedEngine, "naive": NaiveEngine}


def get_engine(name: str) -> type[_Engine]:
    """Look up an engine by name; the error lists the choices."""
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; choose one of {sorted(ENGINES)}") from None
