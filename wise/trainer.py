"""ShardTrainer: writes edits into side-memory shards on one model replica (paper Sec. 2.3.2, Eq. 5).

A shard is ``save_freq`` consecutive edits applied sequentially into a side memory under its own gradient mask.
Shards of one merge group are independent of each other (each starts from the same side memory, the main memory
or WISE-Merge's merged memory, and only its own edits shape it), so one trainer can advance several shards in
lock step as one batched computation (the frozen model is shared; each shard's rows see only its own task
vector), and several trainers on several devices can train different shards at the same time. Merging and
routing are not the trainer's business: see :mod:`wise.memory`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from wise.batch import IGNORE, Row, Tokens
from wise.config import WiseConfig
from wise.engine import Margins, StepConfig, get_engine
from wise.layout import resolve_layout
from wise.masks import shard_mask
from wise.memory import Memory, edit_scores, refresh_threshold
from wise.router import RoutedLinear, token_activation
from wise.state import StateError
from wise.templates import generate_templates

logger = logging.getLogger(__name__)


class EditLike(Protocol):
    """Anything with an id, a prompt and a target (``streams.EditRecord`` fits)."""

    id: str
    prompt: str
    target: str


@dataclass(frozen=True)
class EditOutcome:
    """Per applied edit: optimisation steps, final loss, and its routing activation vs the threshold."""

    edit_id: str
    steps: int
    loss: float
    activation: float
    threshold: float


def check_edit(tokens: Tokens, templates: Sequence[str] | None, edit: EditLike) -> None:
    """Raise :class:`~wise.batch.PromptTooLongError` if ``edit`` does not fit ``max_prompt_tokens`` under every
    context template (needs only the tokenizer: the orchestrator checks records before they reach an editor)."""
    tokens.row(edit.prompt, edit.target)
    for t in templates or ["{}"]:
        tokens.row(edit.prompt, edit.target, t)


class ShardTrainer:
    """Trains side-memory shards on one model.

    Args:
        model: a Hugging Face causal LM; its parameters are frozen and the edited projection is replaced in
            place by a :class:`~wise.router.RoutedLinear`.
        tokenizer: the model's tokenizer.
        cfg: WISE hyper-parameters.
        irrelevant: pool of ``(prompt, answer)`` pairs unrelated to the edits (from records NOT being edited),
            sampled as the margin loss's irrelevant inputs.
        engine: ``cached`` (default) or ``naive`` (full forward each iteration; for benchmarks).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        cfg: WiseConfig,
        irrelevant: Sequence[tuple[str, str]] = (),
        engine: str = "cached",
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.tokens = Tokens(tokenizer, cfg.max_prompt_tokens)
        model.requires_grad_(False)
        model.eval()
        lay = resolve_layout(model, cfg.layer, cfg.module)
        if isinstance(lay.module, RoutedLinear):
            raise StateError(f"{lay.module_path} is already routed: one editor per model")
        self.routed = RoutedLinear(lay.module, transposed=lay.layout.transposed, reduce=cfg.router_reduce)
        model.set_submodule(lay.module_path, self.routed)
        self.layout = resolve_layout(model, cfg.layer, cfg.module)
        self.transposed = lay.layout.transposed
        self.engine = get_engine(engine)(model, self.layout)
        self.irrelevant = [(p, a) for p, a in irrelevant]
        self.templates: list[str] | None = None
        self.margins: Margins | None = None
        self._pool_dirs: torch.Tensor | None = None  # derived from the pool on first use, never saved
        self._pool_center: torch.Tensor | None = None

    # ------------------------------------------------------------------ setup
    @property
    def device(self) -> torch.device:
        return self.routed.weight.device

    def zeros(self) -> torch.Tensor:
        return torch.zeros_like(self.routed.weight, requires_grad=False)

    def new_shard(self, shard_id: int, base: torch.Tensor | None = None) -> Memory:
        """A side memory for shard ``shard_id`` holding no edit (its mask is derived from ``(seed, shard_id)``).

        Args:
            shard_id: the shard's number.
            base: the task vector the shard starts from: WISE-Merge's merged memory
                (:meth:`~wise.memory.MemoryBank.base`); None starts from the main memory (zero task vector).
        """
        if base is None:
            return Memory(self.zeros(), shard_ids=[shard_id])
        if base.shape != self.routed.weight.shape:
            raise ValueError(f"base task vector {tuple(base.shape)} is not {tuple(self.routed.weight.shape)}")
        return Memory(base.detach().to(self.device, self.routed.weight.dtype).clone(), shard_ids=[shard_id])

    def prepare(self) -> None:
        """Do the one-time work up front: context templates, margins, and (with hard negatives) the pool's
        activations. Training calls it lazily; call it before timing edits."""
        self.ensure_ready()
        if self.cfg.hard_negatives and self.irrelevant:
            self._pool_directions()

    def ensure_ready(self) -> None:
        """Sample the context templates and fix the margins on first use (both are part of the state)."""
        if self.templates is None:
            with self.routed.main_only():
                self.templates = generate_templates(
                    self.model, self.tokens.tokenizer, self.cfg.templates, self.cfg.seed
                )
            logger.info("context templates: %s", self.templates)
        if self.margins is None:
            if self.cfg.n_irrelevant and not self.irrelevant:
                logger.warning("no irrelevant pool given: the margin loss runs without irrelevant inputs")
            m = self.cfg.margins
            scale = self.activation_scale() if m.scale == "auto" else 1.0
            self.margins = Margins(m.alpha * scale, m.beta * scale, m.gamma * scale)
            logger.info("activation margins (alpha, beta, gamma) = %s (scale %.3f)", self.margins, scale)

    def setup_state(self) -> dict:
        """Templates and margins, JSON-able: what other replicas need to train identically."""
        self.ensure_ready()
        assert self.margins is not None
        return {"templates": self.templates, "margins": [*vars(self.margins).values()]}

    def load_setup_state(self, state: dict) -> None:
        self.templates = None if state["templates"] is None else list(state["templates"])
        self.margins = None if state["margins"] is None else Margins(*state["margins"])

    @torch.no_grad()
    def activation_scale(self, limit: int = 64) -> float:
        """Median per-token norm of the main memory's output on the irrelevant pool (the layer's natural scale).

        Raises:
            ValueError: the pool is empty (``margins.scale: auto`` needs it).
        """
        if not self.irrelevant:
            raise ValueError(
                "wise.margins.scale=auto needs an irrelevant pool to measure the activation scale"
            )
        keys = self.prompt_keys([p for p, _ in self.irrelevant[:limit]])
        w = self.routed.weight
        norms = torch.cat([token_activation(k.unsqueeze(0).to(w.dtype), w, self.transposed)[0] for k in keys])
        return float(norms.median())

    # ------------------------------------------------------------------ routing keys
    @torch.no_grad()
    def prompt_keys(self, prompts: Sequence[str], batch_size: int = 16) -> list[torch.Tensor]:
        """Inputs of the edited projection over each prompt's tokens (main memory only): (p_i, d_in) each."""
        out: list[torch.Tensor] = []
        captured: dict[str, torch.Tensor] = {}
        hook = self.routed.register_forward_pre_hook(lambda _m, args: captured.__setitem__("a", args[0]))
        try:
            for i in range(0, len(prompts), batch_size):
                rows = [
                    Row((), self.tokens.prompt(p), (self.tokens.pad_id,)) for p in prompts[i : i + batch_size]
                ]
                batch = self.tokens.collate(rows).to(self.device)
                with self.routed.main_only():
                    self.model(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        use_cache=False,
                        logits_to_keep=1,
                    )
                for r, span in zip(captured["a"], batch.span, strict=True):
                    out.append(r[span].to(torch.float16).cpu())
        finally:
            hook.remove()
        return out

    # ------------------------------------------------------------------ irrelevant inputs
    def _pool_directions(self) -> torch.Tensor:
        """Unit-norm, centred mean prompt activation of every pool prompt: (n_pool, d_in), computed once."""
        if self._pool_dirs is None:
            logger.info(
                "measuring %d irrelevant prompts for hard-negative selection (once)", len(self.irrelevant)
            )
            means = torch.stack(
                [k.float().mean(0) for k in self.prompt_keys([p for p, _ in self.irrelevant])]
            )
            self._pool_center = means.mean(0)
            self._pool_dirs = torch.nn.functional.normalize(means - self._pool_center, dim=-1)
        return self._pool_dirs

    def irrelevant_for(self, index: int, edits: Sequence[EditLike]) -> list[tuple[str, str]]:
        """Irrelevant inputs for the optimisation of the edits at stream index ``index``: the hardest pool
        prompts (nearest to the edits' own activations, so the router learns to tell same-relation prompts about
        other subjects apart) plus a seeded random draw from the rest."""
        if not self.irrelevant or not self.cfg.n_irrelevant:
            return []
        exclude = {e.prompt for e in edits}
        allowed = [i for i, (p, _) in enumerate(self.irrelevant) if p not in exclude]
        n_hard = int(round(self.cfg.n_irrelevant * self.cfg.hard_negatives))
        chosen: list[int] = []
        if n_hard:
            dirs = self._pool_directions()
            keys = self.prompt_keys([e.prompt for e in edits])
            query = torch.stack([k.float().mean(0) for k in keys]) - self._pool_center
            sim = (torch.nn.functional.normalize(query, dim=-1) @ dirs.T).amax(0)  # (n_pool,)
            ranked = sim[allowed].argsort(descending=True)[:n_hard].tolist()
            chosen = [allowed[j] for j in ranked]
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_033 + index)
        rest = [
            allowed[j]
            for j in torch.randperm(len(allowed), generator=gen).tolist()
            if allowed[j] not in chosen
        ]
        chosen += rest[: self.cfg.n_irrelevant - len(chosen)]
        return [self.irrelevant[i] for i in chosen]

    # ------------------------------------------------------------------ training
    def _rows(
        self, shard: Memory, index: int, edits: Sequence[EditLike]
    ) -> tuple[list[Row], list[bool], list[int]]:
        """Rows of one optimisation: every edit under every template, replayed edits, then irrelevant inputs.

        Returns rows, is_edit flags, and for each new edit the index of its empty-template row.
        """
        assert self.templates is not None
        rows: list[Row] = []
        flags: list[bool] = []
        key_rows: list[int] = []
        for e in edits:
            key_rows.append(len(rows))
            for t in self.templates:
                rows.append(self.tokens.row(e.prompt, e.target, t))
                flags.append(True)
        if self.cfg.replay and shard.edit_ids:
            gen = torch.Generator().manual_seed(self.cfg.seed * 7_777 + index)
            for j in torch.randperm(len(shard.edit_ids), generator=gen)[: self.cfg.replay_size].tolist():
                rows.append(self.tokens.row(shard.prompts[j], shard.targets[j]))
                flags.append(True)
        for p, a in self.irrelevant_for(index, edits):
            rows.append(self.tokens.row(p, a))
            flags.append(False)
        return rows, flags, key_rows

    def _anchors(self, shard: Memory) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Prompt activations of the shard's earlier edits, padded: (K, P, d_in) and span (K, P)."""
        if not self.cfg.anchor_previous or not shard.keys:
            return None
        keys = shard.keys
        width = max(k.shape[0] for k in keys)
        a = torch.zeros((len(keys), width, keys[0].shape[1]), dtype=self.routed.weight.dtype)
        span = torch.zeros((len(keys), width), dtype=torch.bool)
        for i, k in enumerate(keys):
            a[i, : k.shape[0]] = k.to(a.dtype)
            span[i, : k.shape[0]] = True
        return a.to(self.device), span.to(self.device)

    def validate(self, edit: EditLike) -> None:
        """Raise :class:`~wise.batch.PromptTooLongError` if the edit cannot be tokenised within the limits."""
        self.tokens.row(edit.prompt, edit.target)
        self.ensure_ready()
        check_edit(self.tokens, self.templates, edit)

    def step(
        self, shards: Sequence[Memory], indices: Sequence[int], chunks: Sequence[Sequence[EditLike]]
    ) -> list[list[EditOutcome]]:
        """One optimisation per shard, all shards batched together: shard ``s`` learns ``chunks[s]`` (at most
        ``batch_size`` edits, at stream index ``indices[s]``) on top of its earlier edits.

        The shards' task vectors, edit lists, keys and thresholds are updated in place.

        Returns:
            Per shard, one :class:`EditOutcome` per new edit.

        Raises:
            PromptTooLongError: an edit exceeds ``max_prompt_tokens`` (nothing is applied).
        """
        self.ensure_ready()
        assert self.margins is not None
        rows: list[Row] = []
        flags: list[bool] = []
        owner: list[int] = []
        key_rows: list[list[int]] = []
        for s, (shard, index, edits) in enumerate(zip(shards, indices, chunks, strict=True)):
            r, f, k = self._rows(shard, index, edits)
            key_rows.append([len(rows) + i for i in k])
            rows += r
            flags += f
            owner += [s] * len(r)
        batch = self.tokens.collate(rows)
        is_edit = torch.tensor(flags)
        batch.labels[~is_edit] = IGNORE  # irrelevant inputs only shape the router, they teach no tokens
        batch = batch.to(self.device)
        masks = [
            shard_mask(
                tuple(sh.delta.shape), self.cfg.mask_ratio, self.cfg.mask_kind, self.cfg.seed, sh.shard_ids[0]
            ).to(self.device)
            for sh in shards
        ]
        step = StepConfig(
            self.cfg.lr,
            self.cfg.n_iter,
            self.cfg.early_stop_loss,
            self.cfg.norm_constraint,
            self.margins,
            self.cfg.router_reduce,
        )
        results = self.engine.optimise_shards(
            batch,
            is_edit.to(self.device),
            torch.tensor(owner, device=self.device),
            [sh.delta for sh in shards],
            masks,
            step,
            [self._anchors(sh) for sh in shards],
        )
        outcomes: list[list[EditOutcome]] = []
        for shard, edits, krows, result in zip(shards, chunks, key_rows, results, strict=True):
            for e, r in zip(edits, krows, strict=True):
                shard.keys.append(result.prompt_activations[r][batch.span[r]].to(torch.float16).cpu())
                shard.edit_ids.append(e.id)
                shard.prompts.append(e.prompt)
                shard.targets.append(e.target)
            refresh_threshold(shard, self.cfg, self.transposed)
            scores = edit_scores(shard, self.transposed, self.cfg.router_reduce)[-len(edits) :]
            outcomes.append(
                [
                    EditOutcome(e.id, result.steps, result.loss, float(sc), shard.threshold)
                    for e, sc in zip(edits, scores, strict=True)
                ]
            )
            logger.debug(
                "shard %d: %d edits, %d steps, loss %.4f (ce %.4f, margin %.4f)",
                shard.shard_ids[0],
                len(shard.edit_ids),
                result.steps,
                result.loss,
                result.ce_loss,
                result.margin_loss,
            )
        return outcomes

    def train(
        self,
        shards: Sequence[Memory],
        starts: Sequence[int],
        edits: Sequence[Sequence[EditLike]],
        limit: int | None = None,
    ) -> list[list[EditOutcome]]:
        """Continue several shards in lock step: shard ``s`` applies ``edits[s]`` after the edits it already
        holds (``starts[s]`` is the stream index of the shard's first edit), ``batch_size`` at a time, at most
        ``limit`` edits each (all when None). Shards that run out drop out of the batch.

        Returns:
            Per shard, the outcomes of the edits applied by this call.
        """
        return lockstep(self.step, shards, starts, edits, limit, self.cfg.batch_size)


def lockstep(
    step: Callable[[Sequence[Memory], Sequence[int], Sequence[Sequence[EditLike]]], list[list[EditOutcome]]],
    shards: Sequence[Memory],
    starts: Sequence[int],
    edits: Sequence[Sequence[EditLike]],
    limit: int | None,
    batch_size: int,
) -> list[list[EditOutcome]]:
    """Advance shards together through ``step`` (one optimisation per live shard per call), ``batch_size`` edits
    at a time, at most ``limit`` edits each; shard ``s``'s next edit is at stream index ``starts[s]`` plus the
    edits it holds. Returns per shard the outcomes of the edits applied."""
    todo = [list(e) for e in edits]
    done = [0] * len(shards)
    outcomes: list[list[EditOutcome]] = [[] for _ in shards]
    budget = limit if limit is not None else max((len(t) for t in todo), default=0)
    while True:
        live = [s for s in range(len(shards)) if done[s] < min(len(todo[s]), budget)]
        if not live:
            return outcomes
        chunks = [todo[s][done[s] : done[s] + min(batch_size, budget - done[s])] for s in live]
        outs = step([shards[s] for s in live], [starts[s] + len(shards[s].edit_ids) for s in live], chunks)
        for s, c, o in zip(live, chunks, outs, strict=True):
            done[s] += len(c)
            outcomes[s] += o
