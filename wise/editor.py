"""WiseEditor: sequential WISE editing of one model, all state in one object (paper Sec. 2.3; Algorithm 1).

The editor composes a :class:`~wise.trainer.ShardTrainer` (writes edits into the *active* shard) and a
:class:`~wise.memory.MemoryBank` (the *pending* shards stored every ``save_freq`` edits and the *merged*
memories produced every ``merge_freq`` edits: one for WISE-Merge, on top of which later shards train, a growing
list for WISE-Retrieve). Every applied edit is routable at once: the router sees merged, pending and active
memories alike.
``state_dict()`` / ``load_state_dict()`` capture everything needed to continue identically; ``save()`` /
``load()`` write safetensors + JSON (never pickle). The distributed orchestrator builds the same state from
shards trained on several replicas (:func:`wise.state.compose_state`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from wise.batch import PromptTooLongError
from wise.config import WiseConfig
from wise.memory import Memory, MemoryBank
from wise.state import StateError, check_state, compose_state, read_state, write_state
from wise.trainer import EditLike, EditOutcome, ShardTrainer

logger = logging.getLogger(__name__)


class WiseEditor:
    """Sequential WISE editing of one model: one shard at a time, stored and merged on cadence.

    The arguments are those of :class:`~wise.trainer.ShardTrainer` (model, tokenizer, WISE config, the pool of
    irrelevant ``(prompt, answer)`` pairs, and the engine name).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        cfg: WiseConfig,
        irrelevant: Sequence[tuple[str, str]] = (),
        engine: str = "cached",
    ) -> None:
        self.trainer = ShardTrainer(model, tokenizer, cfg, irrelevant, engine)
        self.model = model
        self.cfg = cfg
        self.tokens = self.trainer.tokens
        self.routed = self.trainer.routed
        self.layout = self.trainer.layout
        self.bank = MemoryBank(cfg, self.trainer.transposed)
        self.active = self.trainer.new_shard(0)

    # ------------------------------------------------------------------ views
    @property
    def templates(self) -> list[str] | None:
        return self.trainer.templates

    @property
    def margins(self):
        return self.trainer.margins

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
        """One-time work up front (templates, margins, pool activations); call it before timing edits."""
        self.trainer.prepare()

    def prompt_keys(self, prompts: Sequence[str], batch_size: int = 16) -> list[torch.Tensor]:
        """Inputs of the edited projection over each prompt's tokens (main memory only): (p_i, d_in) each."""
        return self.trainer.prompt_keys(prompts, batch_size)

    def activation_scale(self, limit: int = 64) -> float:
        return self.trainer.activation_scale(limit)

    def validate(self, edit: EditLike) -> None:
        """Raise :class:`~wise.batch.PromptTooLongError` if the edit cannot be tokenised within the limits."""
        self.trainer.validate(edit)

    def routable(self) -> list[Memory]:
        """Memories the router chooses among: merged, pending, and the active shard once it holds an edit."""
        mems = self.bank.memories()
        if self.active.edit_ids:
            mems.append(self.active)
        return mems

    def _sync_router(self) -> None:
        mems = self.routable()
        if not mems:
            self.routed.set_memories(self.trainer.zeros().unsqueeze(0)[:0], torch.zeros(0))
            return
        self.routed.set_memories(
            torch.stack([m.delta for m in mems]),
            torch.tensor([m.threshold for m in mems], dtype=torch.float32),
        )

    # ------------------------------------------------------------------ editing
    def apply(self, edits: Iterable[EditLike]) -> list[EditOutcome]:
        """Apply edits sequentially (``batch_size`` at a time), storing and merging shards on cadence.

        Args:
            edits: edit records in stream order.

        Returns:
            One :class:`EditOutcome` per edit.

        Raises:
            PromptTooLongError: an edit exceeds ``max_prompt_tokens`` (nothing of that batch is applied).
        """
        self.trainer.ensure_ready()
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
        (outcomes,) = self.trainer.step([self.active], [self.n_edits], [edits])
        if len(self.active.edit_ids) >= self.cfg.save_freq:
            logger.info("shard %d stored (%d edits)", self.active.shard_ids[0], len(self.active.edit_ids))
            closed = self.active
            self.bank.store(closed)  # may merge: the next shard starts from what the bank holds after it
            self.active = self.trainer.new_shard(closed.shard_ids[0] + 1, self.bank.base())
        self._sync_router()
        return outcomes

    def merge(self) -> None:
        """Merge the stored shards now (normally every ``merge_freq`` edits).

        A WISE-Merge active shard is moved onto the new merged memory: it keeps what its own edits wrote on top
        of the old one.
        """
        old = self.bank.base()
        self.bank.merge()
        new = self.bank.base()
        if new is not None and new is not old:
            self.active.delta = self.active.delta + (new if old is None else new - old)
        self._sync_router()

    # ------------------------------------------------------------------ state
    def applied_ids(self) -> list[str]:
        """Ids of all applied edits, in application order."""
        return [*self.bank.edit_ids(), *self.active.edit_ids]

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Return (tensors, JSON-able metadata) describing the full editor state."""
        return compose_state(
            self.cfg,
            self.layout.module_path,
            self.routed.weight.shape,
            {
                "templates": self.trainer.templates,
                "margins": None if self.margins is None else [*vars(self.margins).values()],
            },
            self.bank,
            self.active,
        )

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore a state produced by :meth:`state_dict` (same model and WISE config).

        Raises:
            StateError: version, config, module or shape mismatch.
        """
        check_state(meta, self.layout.module_path, self.routed.weight.shape, self.cfg)
        dev, dtype = self.device, self.routed.weight.dtype
        self.trainer.load_setup_state(meta)
        self.active = Memory.from_state(tensors, "active", meta["active"], dev, dtype)
        self.bank.load(tensors, meta, dev, dtype)
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


__all__ = ["EditOutcome", "Memory", "PromptTooLongError", "StateError", "WiseEditor", "compose_state"]
