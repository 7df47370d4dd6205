"""KeyedEditor: sequential editing of one model in the keyed layout, all state in one object.

The keyed counterpart of :class:`wise.editor.WiseEditor` (same interface: ``apply``, ``merge``,
``state_dict`` / ``load_state_dict``, ``save`` / ``load``, ``model`` / ``routed`` / ``tokens`` for
:func:`wise.evaluate.evaluate_records`), plus :meth:`KeyedEditor.retract`. A
:class:`~wise.keyed.trainer.KeyedTrainer` writes edits into the active shard; a :class:`~wise.keyed.bank.KeyedBank`
stores shards every ``save_freq`` edits and merges them into blocks every ``merge_freq``. Every applied edit is
routable at once. The distributed job builds the same state from shards trained on several replicas.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from wise.config import WiseConfig
from wise.keyed.bank import KeyedBank
from wise.keyed.trainer import KeyedTrainer, normalize_prompt
from wise.memory import Memory
from wise.state import StateError, check_state, compose_state, read_state, write_state
from wise.trainer import EditLike, EditOutcome

logger = logging.getLogger(__name__)


def live_memories(memories: Sequence[Memory]) -> list[Memory]:
    """The memories as the router must see them: an edit whose prompt a later edit repeats is left out (the
    later one supersedes it; the bank removes it for good when the later one's shard is stored)."""
    last: dict[str, tuple[int, int]] = {}
    for j, m in enumerate(memories):
        for i, p in enumerate(m.prompts):
            last[normalize_prompt(p)] = (j, i)
    out = []
    for j, m in enumerate(memories):
        stale = {m.edit_ids[i] for i, p in enumerate(m.prompts) if last[normalize_prompt(p)] != (j, i)}
        if stale:
            m = m.detached()
            m.drop(stale)
        out.append(m)
    return out


class KeyedEditor:
    """Sequential keyed-layout editing of one model (arguments as :class:`~wise.keyed.trainer.KeyedTrainer`)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        cfg: WiseConfig,
        irrelevant: Sequence[tuple[str, str]] = (),
        engine: str = "cached",
    ) -> None:
        self.trainer = KeyedTrainer(model, tokenizer, cfg, irrelevant, engine)
        self.model = model
        self.cfg = cfg
        self.tokens = self.trainer.tokens
        self.routed = self.trainer.routed
        self.layout = self.trainer.layout
        self.bank = KeyedBank(cfg)
        self.active = self.trainer.new_shard(0)

    # ------------------------------------------------------------------ views
    @property
    def templates(self) -> list[str] | None:
        return self.trainer.templates

    @property
    def pending(self) -> list[Memory]:
        return self.bank.pending

    @property
    def merged(self) -> list[Memory]:
        return self.bank.merged

    @property
    def n_edits(self) -> int:
        return self.bank.n_edits() + len(self.active.edit_ids)

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    def prepare(self) -> None:
        """One-time work up front (templates, relation centre); call it before timing edits."""
        self.trainer.prepare()

    def validate(self, edit: EditLike) -> None:
        self.trainer.validate(edit)

    def routable(self) -> list[Memory]:
        """Blocks, pending shards, and the active shard once it holds an edit."""
        mems = self.bank.memories()
        if self.active.edit_ids:
            mems.append(self.active)
        return mems

    def _sync_router(self) -> None:
        self.trainer.ensure_ready()
        self.routed.set_memories(
            live_memories(self.routable()),
            self.trainer.projection,
            self.trainer.center,
            self.cfg.keyed.min_similarity,
            self.trainer.name_flags,
        )

    # ------------------------------------------------------------------ editing
    def apply(self, edits: Iterable[EditLike]) -> list[EditOutcome]:
        """Apply edits sequentially, storing shards and merging them on cadence. Returns one outcome each.

        Raises:
            PromptTooLongError: an edit exceeds ``max_prompt_tokens`` (nothing of it is applied).
        """
        self.trainer.ensure_ready()
        outcomes: list[EditOutcome] = []
        for e in edits:
            start = self.active.shard_ids[0] * self.cfg.save_freq
            (out,) = self.trainer.step([self.active], [start + len(self.active.edit_ids)], [[e]])
            outcomes += out
            if len(self.active.edit_ids) >= self.cfg.save_freq:
                closed = self.active
                self.bank.store(closed)
                self.active = self.trainer.new_shard(closed.shard_ids[0] + 1, self.bank.base())
            self._sync_router()
        return outcomes

    def merge(self) -> None:
        """Merge the stored shards now (normally every ``merge_freq`` edits); the active shard moves onto the
        new block content (it keeps what its own edits wrote)."""
        old = self.bank.base()
        self.bank.merge()
        new = self.bank.base()
        if new is not None and new is not old:
            self.active.delta = self.active.delta + (new if old is None else new - old)
        self._sync_router()

    def retract(self, ids: Iterable[str]) -> list[str]:
        """Remove applied edits (stored or in the active shard); returns the ids found. Their prompts are then
        answered by the main memory again."""
        wanted = set(ids)
        gone = self.bank.retract(wanted)
        found = self.active.drop(wanted)
        self.bank.retracted += found
        self._sync_router()
        return gone + found

    # ------------------------------------------------------------------ state
    def applied_ids(self) -> list[str]:
        """Ids of all edits in the state, in application order."""
        return [*self.bank.edit_ids(), *self.active.edit_ids]

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able metadata) of the full editor state."""
        return compose_state(
            self.cfg,
            self.layout.module_path,
            self.routed.weight.shape,
            self.trainer.setup_state(),
            self.bank,
            self.active,
        )

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore a state produced by :meth:`state_dict` (same model and settings).

        Raises:
            StateError: version, config, module or shape mismatch.
        """
        check_state(meta, self.layout.module_path, self.routed.weight.shape, self.cfg)
        dev, dtype = self.device, self.routed.weight.dtype
        self.trainer.load_setup_state(meta)
        self.active = Memory.from_state(tensors, "active", meta["active"], dev, dtype)
        self.bank.load(tensors, meta, dev, dtype)
        self._sync_router()

    def load_rekeyed(self, directory: str | Path) -> None:
        """Restore a state written with other relation-key settings (``relation_key``, ``relation_dim``; the
        routing-only ones may differ too): what its edits wrote is kept, and each edit's relation key is
        computed again from its stored prompt and subject with this editor's settings and irrelevant pool,
        exactly as editing with them would have stored it (the key is read by the router only).

        Raises:
            StateError: the state differs in another setting, or another module or shape.
        """
        from wise.config import KEYED_KEY_ONLY, KEYED_ROUTING_ONLY

        tensors, meta = read_state(directory)
        saved = type(self.cfg).model_validate(meta["config"])
        mine = self.cfg.model_dump()
        other = sorted(k for k, v in saved.model_dump().items() if k != "keyed" and mine[k] != v)
        other += sorted(
            f"keyed.{k}"
            for k, v in saved.keyed.model_dump().items()
            if mine["keyed"][k] != v and k not in KEYED_KEY_ONLY + KEYED_ROUTING_ONLY
        )
        if other:
            raise StateError(f"cannot re-key a state written with other wise settings: {other}")
        r = self.cfg.keyed.relation_dim
        tensors = {
            k: torch.zeros(v.shape[0], r, dtype=torch.float16) if k.endswith(".relkeys") else v
            for k, v in tensors.items()
        }
        meta = {k: v for k, v in meta.items() if k != "center"}  # this pool's centre, under these settings
        self.load_state_dict(tensors, {**meta, "config": self.cfg.model_dump(mode="json")})
        for m in [*self.bank.memories(), self.active]:
            m.relkeys = self.trainer.edit_keys(m.prompts, m.subjects)
        self._sync_router()
        logger.info("re-keyed %d edits (relation_key %s)", self.n_edits, self.cfg.keyed.relation_key)

    def save(self, directory: str | Path) -> Path:
        """Write the state atomically to ``directory`` (safetensors + JSON). Returns the directory."""
        return write_state(directory, *self.state_dict())

    def load(self, directory: str | Path) -> None:
        """Restore the state written by :meth:`save`."""
        self.load_state_dict(*read_state(directory))


__all__ = ["KeyedEditor", "live_memories"]
