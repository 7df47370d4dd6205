"""The editor actor: one model replica that trains the WISE shards it is given.

The orchestrator hands out shards in stream order (:class:`ShardSpec`); an editor advances up to
``shards_per_editor`` of them in lock step as one batched computation (:meth:`wise.trainer.ShardTrainer.train`)
and returns each shard's progress (:class:`ShardProgress`) through the object store every ``limit`` edits, so
that the orchestrator can checkpoint inside long shards. In-progress shards stay cached in the actor between
calls; a replacement actor (after a crash) starts them again from what the orchestrator sends.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from actors.replica import ModelSpec, load_replica
from wise.config import WiseConfig
from wise.factory import make_trainer
from wise.memory import Memory
from wise.trainer import EditOutcome

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Edit:
    """The part of an edit record that training needs."""

    id: str
    prompt: str
    target: str
    subject: str | None = None


@dataclass(frozen=True)
class ShardSpec:
    """One shard to train: ``edits`` are all of the shard's edits known so far, in stream order.

    Attributes:
        shard_id: the shard's number (its gradient mask is derived from it).
        start: stream index (among accepted edits) of the shard's first edit.
        edits: the shard's edits.
        resume: progress to continue from (its ``edit_ids`` are a prefix of ``edits``), or None to start fresh.
        base: the task vector a fresh shard starts from (WISE-Merge's merged memory), None for the main memory.
    """

    shard_id: int
    start: int
    edits: tuple[Edit, ...]
    resume: Memory | None = None
    base: torch.Tensor | None = None


@dataclass(frozen=True)
class ShardProgress:
    """A shard after an editor call: its side memory so far (CPU) and the outcomes of the edits just applied."""

    shard_id: int
    memory: Memory
    outcomes: tuple[EditOutcome, ...]


class EditorActor:
    """Holds one model replica and trains shards on it.

    Args:
        model: which replica to load.
        cfg: WISE settings (identical on every editor).
        irrelevant: the margin loss's irrelevant pool.
        setup: templates and margins from another editor (:meth:`setup_state`), so all replicas train alike;
            None to derive them here.
    """

    def __init__(
        self,
        model: ModelSpec,
        cfg: WiseConfig,
        irrelevant: list[tuple[str, str]],
        setup: dict | None = None,
    ) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        m, tok = load_replica(model)
        self.trainer = make_trainer(m, tok, cfg, irrelevant)
        if setup is not None:
            self.trainer.load_setup_state(setup)
        self.trainer.prepare()
        self._cache: dict[int, Memory] = {}

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict:
        """Templates and margins (JSON-able), and the edited weight's shape, module path and dtype."""
        w = self.trainer.routed.weight
        return {
            "setup": self.trainer.setup_state(),
            "weight_shape": list(w.shape),
            "module_path": self.trainer.layout.module_path,
            "dtype": str(w.dtype).removeprefix("torch."),
            "model_bytes": sum(p.numel() * p.element_size() for p in self.trainer.model.parameters()),
            "pid": os.getpid(),
        }

    def _memory_for(self, spec: ShardSpec) -> Memory:
        cached = self._cache.get(spec.shard_id)
        done = [e.id for e in spec.edits]
        # the cached copy is current unless the orchestrator sends newer progress
        if (
            cached is not None
            and cached.edit_ids == done[: len(cached.edit_ids)]
            and (spec.resume is None or len(spec.resume.edit_ids) <= len(cached.edit_ids))
        ):
            return cached
        if spec.resume is not None:
            if spec.resume.edit_ids != done[: len(spec.resume.edit_ids)]:
                raise ValueError(f"shard {spec.shard_id}: resume state does not match the shard's edits")
            mem = spec.resume.detached()
            mem.delta = mem.delta.to(self.trainer.device, self.trainer.routed.weight.dtype)
            return mem
        return self.trainer.new_shard(spec.shard_id, spec.base)

    def train(self, specs: list[ShardSpec], limit: int | None = None) -> list[ShardProgress]:
        """Advance the shards in lock step by at most ``limit`` edits each (all remaining when None).

        Returns:
            One :class:`ShardProgress` per spec, in order.
        """
        mems = [self._memory_for(s) for s in specs]
        todo = [list(s.edits[len(m.edit_ids) :]) for s, m in zip(specs, mems, strict=True)]
        outcomes = self.trainer.train(mems, [s.start for s in specs], todo, limit)
        out = []
        for spec, mem, outs in zip(specs, mems, outcomes, strict=True):
            if len(mem.edit_ids) < len(spec.edits) or len(spec.edits) < self.trainer.cfg.save_freq:
                self._cache[spec.shard_id] = mem
            else:
                self._cache.pop(spec.shard_id, None)
            out.append(ShardProgress(spec.shard_id, mem.detached(), tuple(outs)))
        return out

    def forget(self, shard_ids: list[int]) -> None:
        """Drop cached shards (the orchestrator has stored them)."""
        for sid in shard_ids:
            self._cache.pop(sid, None)
