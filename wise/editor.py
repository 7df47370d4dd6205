"""WiseEditor: all WISE state in one object (paper Sec. 2.3; Algorithm 1).

The editor owns the side memories of one model: the *active* shard being trained, the *pending* shards stored
every ``save_freq`` edits and not merged yet, and the *merged* memories produced every ``merge_freq`` edits
(one for WISE-Merge, a growing list for WISE-Retrieve). Every applied edit is routable at once: the router
sees merged, pending and active memories alike. ``state_dict()`` / ``load_state_dict()`` capture everything
needed to continue identically; ``save()`` / ``load()`` write safetensors + JSON (never pickle).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from wise.batch import IGNORE, PromptTooLongError, Row, Tokens
from wise.config import WiseConfig
from wise.engine import EditResult, Margins, StepConfig, get_engine
from wise.layout import resolve_layout
from wise.masks import shard_mask
from wise.merge import get_merger
from wise.router import RoutedLinear, reduce_span, token_activation
from wise.state import STATE_VERSION, StateError, read_state, write_state
from wise.templates import generate_templates

logger = logging.getLogger(__name__)


class EditLike(Protocol):
    """Anything with an id, a prompt and a target (``streams.EditRecord`` fits)."""

    id: str
    prompt: str
    target: str


@dataclass
class Memory:
    """One side memory: its task vector and the edits written into it."""

    delta: torch.Tensor  # (d_out, d_in): side - main
    edit_ids: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    shard_ids: list[int] = field(default_factory=list)
    threshold: float = float("inf")

    def meta(self) -> dict:
        return {
            "edit_ids": self.edit_ids,
            "prompts": self.prompts,
            "targets": self.targets,
            "shard_ids": self.shard_ids,
            "threshold": self.threshold,
        }


@dataclass(frozen=True)
class EditOutcome:
    """Per applied edit: optimisation steps, final loss, and its routing activation vs the threshold."""

    edit_id: str
    steps: int
    loss: float
    activation: float
    threshold: float


class WiseEditor:
    """Sequential WISE editing of one model.

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
            raise StateError(f"{lay.module_path} is already routed: one WiseEditor per model")
        self.routed = RoutedLinear(lay.module, transposed=lay.layout.transposed, reduce=cfg.router_reduce)
        model.set_submodule(lay.module_path, self.routed)
        self.layout = resolve_layout(model, cfg.layer, cfg.module)
        self.engine = get_engine(engine)(model, self.layout)
        self.irrelevant = [(p, a) for p, a in irrelevant]
        if cfg.margins.scale == "auto" and not self.irrelevant:
            raise ValueError(
                "wise.margins.scale=auto needs an irrelevant pool to measure the activation scale"
            )
        if cfg.n_irrelevant and not self.irrelevant:
            logger.warning("no irrelevant pool given: the margin loss runs without irrelevant inputs")
        self.templates: list[str] | None = None
        self.margins: Margins | None = None
        self.n_edits = 0
        self.active = Memory(self._zeros(), shard_ids=[0])
        self.pending: list[Memory] = []
        self.merged: list[Memory] = []
        self._keys: dict[str, torch.Tensor] = {}  # edit id -> (p, d_in) prompt activations (recomputable)
        self._pool_dirs: torch.Tensor | None = None  # derived from the pool on first use, never saved
        self._pool_center: torch.Tensor | None = None

    # ------------------------------------------------------------------ setup
    def _zeros(self) -> torch.Tensor:
        return torch.zeros_like(self.routed.weight, requires_grad=False)

    @property
    def device(self) -> torch.device:
        return self.routed.weight.device

    def prepare(self) -> None:
        """Do the one-time work up front: context templates, margins, and (with hard negatives) the pool's
        activations. Editing calls it lazily; call it before timing edits."""
        self._ensure_ready()
        if self.cfg.hard_negatives and self.irrelevant:
            self._pool_directions()

    def _ensure_ready(self) -> None:
        """Sample the context templates and fix the margins on first use (both are saved in the state)."""
        if self.templates is None:
            with self.routed.main_only():
                self.templates = generate_templates(
                    self.model, self.tokens.tokenizer, self.cfg.templates, self.cfg.seed
                )
            logger.info("context templates: %s", self.templates)
        if self.margins is None:
            m = self.cfg.margins
            scale = self.activation_scale() if m.scale == "auto" else 1.0
            self.margins = Margins(m.alpha * scale, m.beta * scale, m.gamma * scale)
            logger.info("activation margins (alpha, beta, gamma) = %s (scale %.3f)", self.margins, scale)

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
        norms = torch.cat(
            [token_activation(k.unsqueeze(0).to(w.dtype), w, self.layout.layout.transposed)[0] for k in keys]
        )
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

    def _key(self, edit_id: str, prompt: str) -> torch.Tensor:
        if edit_id not in self._keys:
            self._keys[edit_id] = self.prompt_keys([prompt])[0]
        return self._keys[edit_id]

    def _edit_scores(self, memory: Memory) -> torch.Tensor:
        """Routing score of ``memory`` on each of its own edit prompts (empty template), shape (n,)."""
        delta = memory.delta
        scores = [
            reduce_span(
                token_activation(
                    self._key(eid, p).to(self.device, delta.dtype).unsqueeze(0),
                    delta,
                    self.layout.layout.transposed,
                ).float(),
                None,
                self.cfg.router_reduce,
            )[0]
            for eid, p in zip(memory.edit_ids, memory.prompts, strict=True)
        ]
        return torch.stack(scores) if scores else torch.zeros(0)

    def _refresh_threshold(self, memory: Memory) -> None:
        scores = self._edit_scores(memory)
        memory.threshold = self.cfg.act_ratio * float(scores.min()) if scores.numel() else float("inf")

    def routable(self) -> list[Memory]:
        """Memories the router chooses among: merged, pending, and the active shard once it holds an edit."""
        mems = [*self.merged, *self.pending]
        if self.active.edit_ids:
            mems.append(self.active)
        return mems

    def _sync_router(self) -> None:
        mems = self.routable()
        if not mems:
            self.routed.set_memories(self._zeros().unsqueeze(0)[:0], torch.zeros(0))
            return
        self.routed.set_memories(
            torch.stack([m.delta for m in mems]),
            torch.tensor([m.threshold for m in mems], dtype=torch.float32),
        )

    # ------------------------------------------------------------------ editing
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

    def _irrelevant_for(self, index: int, edits: Sequence[EditLike]) -> list[tuple[str, str]]:
        """Irrelevant inputs for one optimisation: the hardest pool prompts (nearest to the edits' own
        activations, so the router learns to tell same-relation prompts about other subjects apart) plus a
        seeded random draw from the rest."""
        if not self.irrelevant or not self.cfg.n_irrelevant:
            return []
        exclude = {e.prompt for e in edits}
        allowed = [i for i, (p, _) in enumerate(self.irrelevant) if p not in exclude]
        n_hard = int(round(self.cfg.n_irrelevant * self.cfg.hard_negatives))
        chosen: list[int] = []
        if n_hard:
            dirs = self._pool_directions()
            query = (
                torch.stack([self._key(e.id, e.prompt).float().mean(0) for e in edits]) - self._pool_center
            )
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

    def _rows(self, edits: Sequence[EditLike]) -> tuple[list[Row], list[bool], list[int]]:
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
        if self.cfg.replay and self.active.edit_ids:
            gen = torch.Generator().manual_seed(self.cfg.seed * 7_777 + self.n_edits)
            n_prev = len(self.active.edit_ids)
            for j in torch.randperm(n_prev, generator=gen)[: self.cfg.replay_size].tolist():
                rows.append(self.tokens.row(self.active.prompts[j], self.active.targets[j]))
                flags.append(True)
        for p, a in self._irrelevant_for(self.n_edits, edits):
            rows.append(self.tokens.row(p, a))
            flags.append(False)
        return rows, flags, key_rows

    def _anchors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Prompt activations of the active shard's earlier edits, padded: (K, P, d_in) and span (K, P)."""
        if not self.cfg.anchor_previous or not self.active.edit_ids:
            return None
        keys = [self._key(e, p) for e, p in zip(self.active.edit_ids, self.active.prompts, strict=True)]
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
        self._ensure_ready()
        for t in self.templates or ["{}"]:
            self.tokens.row(edit.prompt, edit.target, t)

    def apply(self, edits: Iterable[EditLike]) -> list[EditOutcome]:
        """Apply edits sequentially (``batch_size`` at a time), storing and merging shards on cadence.

        Args:
            edits: edit records in stream order.

        Returns:
            One :class:`EditOutcome` per edit.

        Raises:
            PromptTooLongError: an edit exceeds ``max_prompt_tokens`` (nothing of that batch is applied).
        """
        self._ensure_ready()
        outcomes: list[EditOutcome] = []
        chunk: list[EditLike] = []
        for e in edits:
            chunk.append(e)
            if len(chunk) == self.cfg.batch_size:
                outcomes += self._apply_chunk(chunk)
                chunk = []
        if chunk:
            outcomes += self._apply_chunk(chunk)
        return outcomes

    def _apply_chunk(self, edits: list[EditLike]) -> list[EditOutcome]:
        assert self.margins is not None
        rows, flags, key_rows = self._rows(edits)
        batch = self.tokens.collate(rows)
        is_edit = torch.tensor(flags)
        batch.labels[~is_edit] = IGNORE  # irrelevant inputs only shape the router, they teach no tokens
        batch = batch.to(self.device)
        shard_id = self.active.shard_ids[0]
        mask = shard_mask(
            tuple(self.active.delta.shape), self.cfg.mask_ratio, self.cfg.mask_kind, self.cfg.seed, shard_id
        ).to(self.device)
        step = StepConfig(
            self.cfg.lr,
            self.cfg.n_iter,
            self.cfg.early_stop_loss,
            self.cfg.norm_constraint,
            self.margins,
            self.cfg.router_reduce,
        )
        result: EditResult = self.engine.optimise(
            batch, is_edit.to(self.device), self.active.delta, mask, step, anchors=self._anchors()
        )
        for e, r in zip(edits, key_rows, strict=True):
            self._keys[e.id] = result.prompt_activations[r][batch.span[r]].to(torch.float16).cpu()
            self.active.edit_ids.append(e.id)
            self.active.prompts.append(e.prompt)
            self.active.targets.append(e.target)
        self.n_edits += len(edits)
        self._refresh_threshold(self.active)
        scores = self._edit_scores(self.active)[-len(edits) :]
        outcomes = [
            EditOutcome(e.id, result.steps, result.loss, float(s), self.active.threshold)
            for e, s in zip(edits, scores, strict=True)
        ]
        logger.debug(
            "edit %d: %d steps, loss %.4f (ce %.4f, margin %.4f) d_edit %s d_irr %s",
            self.n_edits,
            result.steps,
            result.loss,
            result.ce_loss,
            result.margin_loss,
            result.edit_activation.tolist()[:3],
            result.irrelevant_activation.tolist()[:4],
        )
        if len(self.active.edit_ids) >= self.cfg.save_freq:
            self._close_shard()
        if self.n_edits % self.cfg.merge_freq == 0 and self.pending:
            self.merge()
        self._sync_router()
        return outcomes

    def _close_shard(self) -> None:
        logger.info("shard %d stored (%d edits)", self.active.shard_ids[0], len(self.active.edit_ids))
        self.pending.append(self.active)
        self.active = Memory(self._zeros(), shard_ids=[self.active.shard_ids[0] + 1])

    def merge(self) -> None:
        """Merge the stored shards (TIES): into the single merged memory (WISE-Merge), or into a new memory
        appended to the bank (WISE-Retrieve). Thresholds are re-measured on the merged memory."""
        group = list(self.pending) if self.cfg.retrieve else [*self.merged, *self.pending]
        if not group:
            return
        if len(group) == 1:
            merged = group[0]
        else:
            merger = get_merger(self.cfg.merge.method)
            delta = merger(
                [m.delta for m in group], density=self.cfg.merge.density, weight=self.cfg.merge.weights
            )
            merged = Memory(delta)
            for m in group:
                merged.edit_ids += m.edit_ids
                merged.prompts += m.prompts
                merged.targets += m.targets
                merged.shard_ids += m.shard_ids
        self._refresh_threshold(merged)
        logger.info(
            "%s (%d edits), threshold %.3f",
            f"merged {len(group)} shards"
            if len(group) > 1
            else f"shard {group[0].shard_ids} kept as a memory",
            len(merged.edit_ids),
            merged.threshold,
        )
        self.merged = [*self.merged, merged] if self.cfg.retrieve else [merged]
        self.pending = []
        # Keys are needed again only if this memory is merged once more (WISE-Merge); recompute them then
        # rather than hold every edit's activations for the life of the stream.
        for eid in merged.edit_ids:
            self._keys.pop(eid, None)
        self._sync_router()

    # ------------------------------------------------------------------ state
    def applied_ids(self) -> list[str]:
        """Ids of all applied edits, in application order."""
        return [eid for m in [*self.merged, *self.pending, self.active] for eid in m.edit_ids]

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Return (tensors, JSON-able metadata) describing the full editor state."""
        tensors: dict[str, torch.Tensor] = {"active": self.active.delta.contiguous().cpu()}
        for i, eid in enumerate(self.active.edit_ids):
            # the anchors of the active shard come from the engine's own forward pass: store them so that a
            # resumed editor trains on exactly the same numbers
            tensors[f"active.key.{i}"] = self._key(eid, self.active.prompts[i]).contiguous()
        for kind, mems in (("pending", self.pending), ("merged", self.merged)):
            for i, m in enumerate(mems):
                tensors[f"{kind}.{i}"] = m.delta.contiguous().cpu()
        meta = {
            "version": STATE_VERSION,
            "config": self.cfg.model_dump(mode="json"),
            "module_path": self.layout.module_path,
            "weight_shape": list(self.routed.weight.shape),
            "n_edits": self.n_edits,
            "templates": self.templates,
            "margins": None
            if self.margins is None
            else [self.margins.alpha, self.margins.beta, self.margins.gamma],
            "active": self.active.meta(),
            "pending": [m.meta() for m in self.pending],
            "merged": [m.meta() for m in self.merged],
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore a state produced by :meth:`state_dict` (same model and WISE config).

        Raises:
            StateError: version, config, module or shape mismatch.
        """
        if meta.get("version") != STATE_VERSION:
            raise StateError(f"state format version {meta.get('version')} is not {STATE_VERSION}")
        if (
            meta["module_path"] != self.layout.module_path
            or list(self.routed.weight.shape) != meta["weight_shape"]
        ):
            raise StateError(
                f"state edits {meta['module_path']} {meta['weight_shape']}, this editor "
                f"{self.layout.module_path} {list(self.routed.weight.shape)}"
            )
        saved = WiseConfig.model_validate(meta["config"])
        if saved != self.cfg:
            diff = sorted(k for k, v in saved.model_dump().items() if self.cfg.model_dump()[k] != v)
            raise StateError(f"state was written with different wise settings: {diff}")

        def mem(m: dict, key: str) -> Memory:
            return Memory(
                tensors[key].to(self.device, self.routed.weight.dtype),
                list(m["edit_ids"]),
                list(m["prompts"]),
                list(m["targets"]),
                list(m["shard_ids"]),
                float(m["threshold"]),
            )

        self.n_edits = int(meta["n_edits"])
        self.templates = meta["templates"]
        self.margins = None if meta["margins"] is None else Margins(*meta["margins"])
        self.active = mem(meta["active"], "active")
        self._keys.clear()
        for i, eid in enumerate(self.active.edit_ids):
            self._keys[eid] = tensors[f"active.key.{i}"]
        self.pending = [mem(m, f"pending.{i}") for i, m in enumerate(meta["pending"])]
        self.merged = [mem(m, f"merged.{i}") for i, m in enumerate(meta["merged"])]
        self._sync_router()

    def save(self, directory: str | Path) -> Path:
        """Write the state atomically to ``directory`` (safetensors + JSON). Returns the directory."""
        return write_state(directory, *self.state_dict())

    def load(self, directory: str | Path) -> None:
        """Restore the state written by :meth:`save`.

        Raises:
            StateError: missing files or a mismatching state.
        """
        self.load_state_dict(*read_state(directory))


__all__ = ["EditOutcome", "Memory", "PromptTooLongError", "StateError", "WiseEditor"]
