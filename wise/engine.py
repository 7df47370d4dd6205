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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wise.batch import IGNORE, Batch
from wise.layout import ResolvedLayout
from wise.router import reduce_span, token_activation


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


class _Engine:
    """Shared optimisation loop; subclasses say how the loss is computed."""

    def __init__(self, model: nn.Module, layout: ResolvedLayout) -> None:
        self.model = model
        self.layout = layout

    def _prepare(self, batch: Batch, is_edit: torch.Tensor) -> object:
        raise NotImplementedError

    def _forward(
        self, state: object, batch: Batch, delta: torch.Tensor, reduce: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (CE loss over label positions, (B,) routing activations of every row)."""
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
        """Train ``delta`` in place on one batch.

        Args:
            batch: edit rows (label tokens set) and irrelevant rows (no labels).
            is_edit: (B,) bool, True for edit rows.
            delta: side-memory task vector (d_out, d_in); updated in place.
            mask: bool gradient mask of the shard, same shape as ``delta``.
            cfg: step settings.
            anchors: optional ``(a, span)`` of shapes (K, P, d_in) / (K, P): prompt activations of edits
                already in this shard. They join the in-scope side of the margin loss, so that training a new
                edit does not pull earlier edits' routing activations below the threshold. They need no
                forward pass: they live at the edited layer.

        Returns:
            The :class:`EditResult`.
        """
        state = self._prepare(batch, is_edit)
        transposed = self.layout.layout.transposed
        delta.requires_grad_(True)
        maskf = mask.to(delta.dtype)
        steps, total, ce, ml, dist = 0, float("nan"), float("nan"), float("nan"), None
        try:
            for steps in range(1, cfg.n_iter + 1):  # noqa: B007 - steps is reported
                ce_t, dist = self._forward(state, batch, delta, cfg.reduce)
                d_edit = dist[is_edit]
                if anchors is not None:
                    d_anchor = reduce_span(
                        token_activation(anchors[0], delta, transposed).float(), anchors[1], cfg.reduce
                    )
                    d_edit = torch.cat([d_edit, d_anchor])
                ml_t = margin_loss(d_edit, dist[~is_edit], cfg.margins)
                loss = ce_t + ml_t
                total, ce, ml = loss.item(), ce_t.item(), ml_t.item()
                if total < cfg.early_stop_loss:
                    break
                loss.backward()
                _sgd_step(delta, maskf, cfg.lr, cfg.norm_constraint)
            with torch.no_grad():
                _, dist = self._forward(state, batch, delta, cfg.reduce)
        finally:
            delta.requires_grad_(False)
            delta.grad = None
        return EditResult(
            steps, total, ce, ml, dist[is_edit].detach(), dist[~is_edit].detach(), self._activations(state)
        )


@dataclass
class _Frozen:
    a: torch.Tensor  # (B, T, d_in) input of the edited projection
    o0: torch.Tensor  # (B, T, d_model) edited block's output with the main memory
    upper: list[tuple[nn.Module, tuple, dict]]  # blocks above, with the extra args they were called with
    edit_rows: torch.Tensor  # (E,) rows that carry labels; irrelevant rows never enter the upper blocks
    label_rows: torch.Tensor  # (N,) row index (among edit rows) of each label position
    label_cols: torch.Tensor  # (N,) column index
    label_ids: torch.Tensor  # (N,)


class CachedEngine(_Engine):
    """Runs the frozen prefix once per edit and only the layers above the edited one per iteration."""

    def _prepare(self, batch: Batch, is_edit: torch.Tensor) -> _Frozen:
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
        o0 = o0[0] if isinstance(o0, tuple) else o0
        edit_rows = is_edit.nonzero(as_tuple=True)[0]
        # The blocks above were called on the whole batch; keep their per-row arguments for the edit rows only.
        n = len(is_edit)
        upper = [
            (blk, _rows(args, edit_rows, n), {k: _rows(v, edit_rows, n) for k, v in kw.items()})
            for blk, args, kw in upper
        ]
        labels = batch.labels[edit_rows]
        rows, cols = (labels != IGNORE).nonzero(as_tuple=True)
        return _Frozen(
            captured["a"].detach(), o0.detach()[edit_rows], upper, edit_rows, rows, cols, labels[rows, cols]
        )

    def _forward(
        self, st: _Frozen, batch: Batch, delta: torch.Tensor, reduce: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        transposed = self.layout.layout.transposed
        side = st.a @ delta if transposed else st.a @ delta.T  # (B, T, d_model)
        h = st.o0 + side[st.edit_rows]  # (E, T, d_model): only edit rows need the layers above
        for blk, args, kwargs in st.upper:
            if "hidden_states" in kwargs:
                out = blk(*args, **{**kwargs, "hidden_states": h})
            else:
                out = blk(h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        h = self.layout.final_norm(h[st.label_rows, st.label_cols])  # (N, d_model): label positions only
        logits = self.layout.lm_head(h).float()  # (N, V)
        ce = F.cross_entropy(logits, st.label_ids)
        dist = reduce_span(side.float().norm(dim=-1), batch.span, reduce)  # (B,)
        return ce, dist

    def _activations(self, st: _Frozen) -> torch.Tensor:
        return st.a


class NaiveEngine(_Engine):
    """Full forward pass and full-vocabulary logits at every iteration (the reference's cost profile)."""

    def _prepare(self, batch: Batch, is_edit: torch.Tensor) -> dict:
        return {}

    def _forward(
        self, st: dict, batch: Batch, delta: torch.Tensor, reduce: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        transposed = self.layout.layout.transposed

        def add_side(_m, args, out):
            st["a"] = args[0]
            return out + (args[0] @ delta if transposed else args[0] @ delta.T)

        hook = self.layout.module.register_forward_hook(add_side)
        try:
            with _main_only(self.layout.module):
                logits = self.model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
                ).logits.float()  # (B, T, V)
        finally:
            hook.remove()
        ce = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE)
        dist = reduce_span(token_activation(st["a"], delta, transposed).float(), batch.span, reduce)
        return ce, dist

    def _activations(self, st: dict) -> torch.Tensor:
        return st["a"].detach()


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
