"""KeyedTrainer: writes edits into the keyed layout's shards on one model replica.

An edit owns ``keyed.columns`` columns of its memory, drawn at random from ``(seed, stream index)``: it writes
only those columns and, at inference, reads only those (:func:`wise.keyed.table.residual`). Training fits them by
Adam on the target's teacher-forced loss under the context templates, with everything below the edited layer run
once per edit and only the blocks above it per step (:class:`~wise.engine.CachedEngine`). The loss is
checked before each step, so an edit that its columns already answer costs one forward.

With ``keyed.values`` an edit also learns one output vector of its own, added at every token of a query routed to
it: one more column whose input is constant, moved by Adam at ``value_lr`` instead of ``lr``. Fast, it carries most
of the edit, the same for every phrasing of the query, so rephrases get the new answer (generalization 0.45 ->
0.92 on the development split, ``docs/design.md``), and no other edit writes it.

Columns drawn at random rather than from the prompt's largest activations keep two edits' columns apart: on the
development split the top-64 activation columns of two prompts overlapped 7x more than random ones, and one
memory of 300 edits kept reliability 0.64 with them, 1.00 with random columns (``docs/design.md``).

Several shards advance in lock step as one batched computation (each row reads only its own shard's columns).
The trainer also computes what routing needs: the subject's token ids and the relation key of each edit.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from wise.batch import Row, Tokens
from wise.config import WiseConfig
from wise.engine import CachedEngine
from wise.keyed.names import encode_flags, flags_of, name_flags, name_span
from wise.keyed.router import KeyedLinear
from wise.keyed.table import last_positions, relation_vectors, subject_positions
from wise.layout import resolve_layout
from wise.memory import Memory
from wise.router import RoutedLinear
from wise.state import StateError
from wise.templates import generate_templates
from wise.trainer import EditLike, EditOutcome, check_edit, lockstep

logger = logging.getLogger(__name__)

_COLUMN_STREAM = 0x5EED_00C0
_PROJECTION_STREAM = 0x5EED_0DD1
_BETAS, _EPS = (0.9, 0.999), 1e-8


def edit_columns(d_in: int, k: int, seed: int, index: int) -> torch.Tensor:
    """The ``k`` columns (sorted) of the edit at stream ``index``: a pure function of ``(seed, index)``."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + index * 7919 + _COLUMN_STREAM) % (2**63 - 1))
    return torch.randperm(d_in, generator=gen)[:k].sort().values


def relation_projection(d_in: int, r: int, seed: int) -> torch.Tensor:
    """The fixed (d_in, r) Gaussian projection of relation keys (a pure function of ``seed``)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + _PROJECTION_STREAM) % (2**63 - 1))
    return torch.randn(d_in, r, generator=gen) / math.sqrt(r)


def key_projection(keyed, seed: int, d_in: int, width: int) -> torch.Tensor:
    """The relation keys' projection for the settings ``keyed`` (a :class:`~wise.config.KeyedConfig`): from the
    edited projection's input (``d_in``) for ``relation_key: mean``; from the residual stream (``width``) for
    ``residual``, the identity when ``relation_dim`` is that width (the key kept whole)."""
    if keyed.relation_key == "residual":
        if keyed.relation_dim == width:
            return torch.eye(width)
        return relation_projection(width, keyed.relation_dim, seed)
    return relation_projection(d_in, keyed.relation_dim, seed)


def normalize_prompt(text: str) -> str:
    """The supersede key of an edit: lower case, single spaces, no trailing punctuation."""
    return " ".join(text.lower().split()).rstrip(" ?.!:;,")


class KeyedTrainer:
    """Trains keyed-layout shards on one model (same interface as :class:`wise.trainer.ShardTrainer`).

    Args:
        model: a Hugging Face causal LM; frozen; its edited projection is replaced by a :class:`KeyedLinear`.
        tokenizer: its tokenizer.
        cfg: settings (``layout: keyed``).
        irrelevant: ``(prompt, answer)`` pairs never edited: the relation keys are centred on their mean, and
            subjects of records that name none are the prompt's tokens that are rare among them.
        engine: only ``cached`` (the keyed layout never needs the full forward).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        cfg: WiseConfig,
        irrelevant: Sequence[tuple[str, str]] = (),
        engine: str = "cached",
    ) -> None:
        if cfg.layout != "keyed":
            raise ValueError(f"KeyedTrainer trains layout 'keyed', not {cfg.layout!r}")
        if engine != "cached":
            raise ValueError(f"the keyed layout trains with the cached engine only, not {engine!r}")
        self.model = model
        self.cfg = cfg
        self.tokens = Tokens(tokenizer, cfg.max_prompt_tokens)
        model.requires_grad_(False)
        model.eval()
        lay = resolve_layout(model, cfg.layer, cfg.module)
        if isinstance(lay.module, KeyedLinear | RoutedLinear):
            raise StateError(f"{lay.module_path} is already routed: one editor per model")
        self.routed = KeyedLinear(lay.module, transposed=lay.layout.transposed)
        model.set_submodule(lay.module_path, self.routed)
        self.routed.relation_key = cfg.keyed.relation_key
        residual = cfg.keyed.relation_key == "residual"
        self._hooks = self.routed.attach(model, lay.block if residual else None)
        self.layout = resolve_layout(model, cfg.layer, cfg.module)
        self.transposed = lay.layout.transposed
        self.engine = CachedEngine(model, self.layout)
        self.irrelevant = [(p, a) for p, a in irrelevant]
        width = model.get_input_embeddings().embedding_dim
        self.projection = key_projection(cfg.keyed, cfg.seed, self.routed.d_in, width).to(self.device)
        self.templates: list[str] | None = None
        self.center: torch.Tensor | None = None  # (r,) mean relation vector of the irrelevant pool
        self._df: Counter[int] | None = None  # token document frequencies in the pool (derived subjects)
        # whole-name routing flags of the vocabulary (wise.keyed.names), None when the rule is off
        self.name_flags = name_flags(tokenizer) if cfg.keyed.whole_names else None

    # ------------------------------------------------------------------ setup
    @property
    def device(self) -> torch.device:
        return self.routed.weight.device

    def zeros(self) -> torch.Tensor:
        return torch.zeros_like(self.routed.weight, requires_grad=False)

    def new_shard(self, shard_id: int, base: torch.Tensor | None = None) -> Memory:
        """A shard holding no edit, starting from ``base`` (its block as the earlier merge groups left it,
        :meth:`~wise.keyed.bank.KeyedBank.base`; None: a new block)."""
        k, r = self.cfg.keyed.columns, self.cfg.keyed.relation_dim
        if base is not None and base.shape != self.routed.weight.shape:
            raise ValueError(f"base task vector {tuple(base.shape)} is not {tuple(self.routed.weight.shape)}")
        start = (
            self.zeros() if base is None else base.detach().to(self.device, self.routed.weight.dtype).clone()
        )
        return Memory(
            start,
            shard_ids=[shard_id],
            columns=torch.zeros(0, k, dtype=torch.long),
            relkeys=torch.zeros(0, r, dtype=torch.float16),
            values=torch.zeros(0, self.routed.d_out, dtype=torch.float16) if self.cfg.keyed.values else None,
        )

    def prepare(self) -> None:
        """One-time work up front (templates, the pool's relation centre); call it before timing edits."""
        self.ensure_ready()

    def ensure_ready(self) -> None:
        if self.templates is None:
            with self.routed.main_only():
                self.templates = generate_templates(
                    self.model, self.tokens.tokenizer, self.cfg.templates, self.cfg.seed
                )
            logger.info("context templates: %s", self.templates)
        if self.center is None:
            if self.irrelevant:
                means = self.key_inputs([p for p, _ in self.irrelevant])
                self.center = (means @ self.projection).mean(0)
            else:
                logger.warning("no irrelevant pool given: relation keys are not centred")
                self.center = torch.zeros(self.cfg.keyed.relation_dim, device=self.device)

    def setup_state(self) -> dict:
        """Templates and the relation centre, JSON-able: what other replicas need to train identically."""
        self.ensure_ready()
        assert self.center is not None
        state = {"templates": self.templates, "center": self.center.float().cpu().tolist()}
        if self.cfg.keyed.relation_key == "residual":  # the serving snapshot rebuilds the projection from it
            state["key_width"] = int(self.projection.shape[0])
        if self.name_flags is not None:
            state["name_flags"] = encode_flags(self.name_flags)
        return state

    def load_setup_state(self, state: dict) -> None:
        self.templates = None if state.get("templates") is None else list(state["templates"])
        center = state.get("center")
        self.center = None if center is None else torch.tensor(center, device=self.device)

    # ------------------------------------------------------------------ keys
    @torch.no_grad()
    def key_inputs(
        self,
        prompts: Sequence[str],
        batch_size: int = 16,
        subjects: Sequence[Sequence[Sequence[int]]] | None = None,
    ) -> torch.Tensor:
        """What the relation key of each prompt reads (main memory only): the mean input of the edited
        projection over its tokens (n, d_in), without the tokens of its subject when ``subjects`` gives each
        prompt's subject variants (as an edit stores its key), or with ``relation_key: residual`` the edited
        block's input at its last token (n, width)."""
        residual = self.cfg.keyed.relation_key == "residual"
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
                a = captured["a"]
                if residual:  # the router's own capture of the edited block's input (attach)
                    h = self.routed.block_input
                    out.append(h[torch.arange(h.shape[0], device=h.device), last_positions(batch.span)])
                else:
                    keep = batch.span.clone()
                    for j, variants in enumerate(subjects[i : i + batch_size] if subjects else ()):
                        pos = keep[j].nonzero().squeeze(1)
                        drop = subject_positions(batch.input_ids[j, pos].tolist(), variants)
                        if 0 < len(drop) < len(pos):  # a prompt that is all subject keeps its tokens
                            keep[j, pos[drop]] = False
                    span = keep.to(a.dtype).unsqueeze(-1)
                    out.append((a * span).sum(1) / span.sum(1).clamp(min=1.0))
        finally:
            hook.remove()
        return torch.cat(out).float() if out else torch.zeros(0, self.projection.shape[0], device=self.device)

    def edit_keys(self, prompts: Sequence[str], subjects: Sequence[Sequence[Sequence[int]]]) -> torch.Tensor:
        """The relation keys that edits of these prompts and subject variants store, computed from the
        prompts alone (as :meth:`step` computes them while training): (n, r) float16 on the CPU."""
        self.ensure_ready()
        inputs = self.key_inputs(prompts, subjects=subjects)
        return relation_vectors(inputs, self.projection, self.center).to(torch.float16).cpu()

    def subject_variants(self, edit: EditLike) -> list[list[int]]:
        """Token ids of the edit's subject mid-sentence (``" X"``) and at a prompt's start (``"X"``).

        A record without a ``subject`` gets the longest run of its prompt's tokens that are rare in the
        irrelevant pool (in at most 2% of its prompts), widened to whole words and to the capitalised words next
        to them (:func:`wise.keyed.names.name_span`): the words that name the entity, not the relation.
        """
        subject = (getattr(edit, "subject", None) or "").strip() or self._derived_subject(edit.prompt)
        variants: list[list[int]] = []
        for text in (" " + subject, subject):
            ids = list(self.tokens.plain(text))
            if ids and ids not in variants:
                variants.append(ids)
        return variants

    def _derived_subject(self, prompt: str) -> str:
        if self._df is None:
            self._df = Counter(t for p, _ in self.irrelevant for t in set(self.tokens.plain(p)))
        ids = list(self.tokens.plain(prompt))
        limit = max(1.0, 0.02 * len(self.irrelevant))
        best: tuple[int, int] = (0, 0)
        start = None
        for i, t in enumerate([*ids, None]):
            rare = t is not None and self._df[t] <= limit
            if rare and start is None:
                start = i
            if not rare and start is not None:
                if i - start >= best[1] - best[0]:
                    best = (start, i)
                start = None
        if best[1] == best[0]:
            return prompt
        start, end = name_span(flags_of(self.tokens.tokenizer, ids), *best)  # whole words, whole name
        return self.tokens.tokenizer.decode(ids[start:end]).strip() or prompt

    # ------------------------------------------------------------------ training
    def validate(self, edit: EditLike) -> None:
        """Raise :class:`~wise.batch.PromptTooLongError` if the edit cannot be tokenised within the limits."""
        self.tokens.row(edit.prompt, edit.target)
        self.ensure_ready()
        check_edit(self.tokens, self.templates, edit)

    def _read_columns(self, delta: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """(d_out, k) view-copy of the columns ``cols`` of a task vector."""
        return delta[cols, :].T if self.transposed else delta[:, cols]

    def _write_columns(self, delta: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
        if self.transposed:
            delta[cols, :] = values.T.to(delta.dtype)
        else:
            delta[:, cols] = values.to(delta.dtype)

    def step(
        self, shards: Sequence[Memory], indices: Sequence[int], chunks: Sequence[Sequence[EditLike]]
    ) -> list[list[EditOutcome]]:
        """One edit per shard, all shards batched: shard ``s`` learns ``chunks[s]`` (one edit, at stream index
        ``indices[s]``) into its columns. Task vectors, edit lists and routing keys are updated in place."""
        self.ensure_ready()
        assert self.templates is not None and self.center is not None
        if any(len(c) != 1 for c in chunks):
            raise ValueError("the keyed layout applies one edit per shard per step")
        edits = [c[0] for c in chunks]
        rows, owner = [], []
        for s, e in enumerate(edits):
            for t in self.templates:
                rows.append(self.tokens.row(e.prompt, e.target, t))
                owner.append(s)
        batch = self.tokens.collate(rows).to(self.device)
        n = len(shards)
        st = self.engine.frozen_prefix(batch, torch.tensor(owner), n)
        block_input = self.routed.block_input  # the edited block's input of that forward (residual keys)
        cols = [
            edit_columns(self.routed.d_in, self.cfg.keyed.columns, self.cfg.seed, i).to(self.device)
            for i in indices
        ]
        # each shard's edit rows (templates, in plan order) restricted to its columns: (n_s, T, k)
        a_cols = [st.a_parts[s].index_select(-1, cols[s]) for s in range(n)]
        params = torch.stack([self._read_columns(sh.delta, c) for sh, c in zip(shards, cols, strict=True)])
        values = self.cfg.keyed.values
        # the edit's own output vector: one more column whose input is value_lr / lr at every token, so that
        # Adam (invariant to a gradient's scale) moves the vector at value_lr while the columns move at lr
        scale = self.cfg.keyed.value_lr / self.cfg.keyed.lr
        if values:
            a_cols = [torch.cat([a, torch.full_like(a[..., :1], scale)], -1) for a in a_cols]
            params = torch.cat([params, params.new_zeros(n, params.shape[1], 1)], -1)
        params = params.float().requires_grad_(True)  # (S, d_out, k [+ 1])
        steps, losses = self._fit(st, a_cols, params)
        outcomes = []
        with torch.no_grad():
            variants = [self.subject_variants(e) for e in edits]
            keys = self._relation_keys(st, batch, variants, block_input)
            for s, (shard, e) in enumerate(zip(shards, edits, strict=True)):
                self._write_columns(shard.delta, cols[s], params[s, :, : cols[s].numel()].detach())
                if values:
                    vec = (params[s, :, -1].detach() * scale).to(torch.float16).cpu().unsqueeze(0)
                    shard.values = torch.cat([shard.values, vec])  # type: ignore[list-item]
                shard.edit_ids.append(e.id)
                shard.prompts.append(e.prompt)
                shard.targets.append(e.target)
                shard.columns = torch.cat([shard.columns, cols[s].cpu().unsqueeze(0)])  # type: ignore[list-item]
                shard.relkeys = torch.cat([shard.relkeys, keys[s : s + 1]])  # type: ignore[list-item]
                shard.subjects.append(variants[s])
                outcomes.append([EditOutcome(e.id, steps[s], losses[s], float("nan"), float("nan"))])
        return outcomes

    def _relation_keys(self, st, batch, variants: list[list[list[int]]], block_input=None) -> torch.Tensor:
        """Each edit's relation key: the mean activation of its prompt's tokens besides its subject (on the
        empty template's row), or with ``relation_key: residual`` the edited block's input ``block_input`` at
        the prompt's last token, as :func:`wise.keyed.table.route` measures a query. (S, r) float16."""
        means = []
        for s, v in enumerate(variants):
            row = int(st.plan.rows[s][0])  # the empty template's row of shard s
            if self.cfg.keyed.relation_key == "residual":
                if block_input is None or block_input.shape[0] != batch.span.shape[0]:
                    raise StateError("residual relation keys need the edited block's input of the edit batch")
                means.append(block_input[row, last_positions(batch.span[row : row + 1])[0]].float())
                continue
            span = batch.span[row].nonzero().squeeze(1)
            ids = batch.input_ids[row, span].tolist()
            subject = set(subject_positions(ids, v))
            keep = [int(p) for i, p in enumerate(span.tolist()) if i not in subject] or span.tolist()
            means.append(st.a[row, keep].float().mean(0))
        return relation_vectors(torch.stack(means), self.projection, self.center).to(torch.float16).cpu()

    def _fit(self, st, a_cols: list[torch.Tensor], params: torch.Tensor) -> tuple[list[int], list[float]]:
        """Adam on each shard's columns until its target loss is below ``early_stop_loss`` (checked before every
        step) or ``n_iter`` steps ran. Returns per shard the steps taken and the last loss."""
        kc = self.cfg.keyed
        n = params.shape[0]
        m, v = torch.zeros_like(params), torch.zeros_like(params)
        t = torch.zeros(n, device=params.device)
        steps, losses = [0] * n, [float("nan")] * n
        active = list(range(n))
        self.engine.select(st, active)
        for _ in range(kc.n_iter + 1):
            sel = st.sel
            extra = torch.cat([a_cols[s] @ params[s].T.to(a_cols[s].dtype) for s in active])  # (E, T, d_out)
            tok = self.engine.label_loss(st, extra)
            ce = tok.new_zeros(len(active)).index_add_(0, sel.label_group, tok) / sel.n_labels
            values = ce.tolist()  # the one host sync per step
            for s, val in zip(active, values, strict=True):
                losses[s] = val
            keep = [
                i
                for i, val in enumerate(values)
                if val >= kc.early_stop_loss and steps[active[i]] < kc.n_iter
            ]
            if not keep:
                break
            ce[keep].sum().backward()
            with torch.no_grad():
                idx = torch.tensor([active[i] for i in keep], device=params.device)
                g = params.grad[idx]
                t[idx] += 1
                m[idx] = _BETAS[0] * m[idx] + (1 - _BETAS[0]) * g
                v[idx] = _BETAS[1] * v[idx] + (1 - _BETAS[1]) * g * g
                bc1 = (1 - _BETAS[0] ** t[idx]).view(-1, 1, 1)
                bc2 = (1 - _BETAS[1] ** t[idx]).view(-1, 1, 1)
                params[idx] -= kc.lr * (m[idx] / bc1) / ((v[idx] / bc2).sqrt() + _EPS)
                params.grad = None
            for i in keep:
                steps[active[i]] += 1
            if len(keep) < len(active):
                active = [active[i] for i in keep]
                self.engine.select(st, active)
        params.requires_grad_(False)
        return steps, losses

    def train(
        self,
        shards: Sequence[Memory],
        starts: Sequence[int],
        edits: Sequence[Sequence[EditLike]],
        limit: int | None = None,
    ) -> list[list[EditOutcome]]:
        """Continue several shards in lock step (as :meth:`wise.trainer.ShardTrainer.train`)."""
        return lockstep(self.step, shards, starts, edits, limit, 1)


__all__ = [
    "KeyedTrainer",
    "edit_columns",
    "key_projection",
    "normalize_prompt",
    "relation_projection",
]
