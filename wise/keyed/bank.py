"""The keyed layout's memory: stored shards merged into a bounded number of residual blocks.

Block ``j`` takes the shards whose edits fall in ``[j * block_edits, (j + 1) * block_edits)``: memory grows by
one dense block per ``block_edits`` edits plus a few hundred bytes of keys per edit, and a merged block never
opens for a query by itself (routing is by subject, :mod:`wise.keyed.table`). As in WISE-Merge, the shards of one
merge group (``merge_freq / save_freq`` shards, trained in parallel) all start from their block as the earlier
groups left it, and write only their edits' columns; the merge adds what each changed,
``block + sum(shard - block)``, and the next group starts from the result. Stored shards wait in ``pending``
(routable) until their group is complete.

Edits that change: storing an edit whose prompt matches an earlier edit's (:func:`normalize_prompt`) removes
the earlier one's keys (it is *superseded*); :meth:`KeyedBank.retract` removes an edit's keys on request. The
columns they wrote keep their values, which no query reaches any more; the edits that share those columns were
trained with them in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from wise.config import WiseConfig
from wise.keyed.trainer import normalize_prompt
from wise.memory import Memory

logger = logging.getLogger(__name__)


class KeyedBank:
    """Residual blocks (``merged``) and stored shards not merged yet (``pending``), with the merge cadence.

    Args:
        cfg: settings (``layout: keyed``; ``save_freq``, ``merge_freq``, ``keyed.block_edits``).
        transposed: unused (the blocks have the edited weight's own layout); kept for a common signature.

    Attributes:
        superseded: ids of edits replaced by a later edit of the same prompt, in order.
        retracted: ids of edits removed by :meth:`retract`, in order.
        on_merge: called after every merge with the merged shards, None and the block they went into.
    """

    def __init__(self, cfg: WiseConfig, transposed: bool = False) -> None:
        if cfg.layout != "keyed":
            raise ValueError(f"KeyedBank holds layout 'keyed', not {cfg.layout!r}")
        self.cfg = cfg
        self.transposed = transposed
        self.pending: list[Memory] = []
        self.merged: list[Memory] = []
        self.superseded: list[str] = []
        self.retracted: list[str] = []
        self.on_merge: Callable[[list[Memory], torch.Tensor | None, Memory], None] | None = None

    # ------------------------------------------------------------------ views
    def memories(self) -> list[Memory]:
        """Blocks then pending shards: the router's order."""
        return [*self.merged, *self.pending]

    def edit_ids(self) -> list[str]:
        return [eid for m in self.memories() for eid in m.edit_ids]

    def n_edits(self) -> int:
        return sum(len(m.edit_ids) for m in self.memories())

    def stored_shards(self) -> int:
        """How many shards were stored (shard ids are consecutive from 0)."""
        return 1 + max((m.shard_ids[-1] for m in self.memories() if m.shard_ids), default=-1)

    def block_of(self, shard_id: int) -> int:
        return shard_id * self.cfg.save_freq // self.cfg.keyed.block_edits

    def base(self) -> torch.Tensor | None:
        """What the next merge group's shards start from: their block as it stands (None: a new block)."""
        j = self.block_of(self.stored_shards())
        return self.merged[j].delta if j < len(self.merged) else None

    def first_of_group(self, shard_id: int) -> int:
        per_group = self.cfg.merge_freq // self.cfg.save_freq
        return shard_id // per_group * per_group

    def startable(self, shard_id: int, next_store: int) -> bool:
        """A fresh shard starts once the groups before its own are merged (its base exists)."""
        return self.first_of_group(shard_id) <= next_store

    # ------------------------------------------------------------------ storing
    def store(self, shard: Memory) -> bool:
        """Store a closed shard (in stream order), superseding earlier edits of its prompts, then merge if
        the cadence says so. Returns True when a merge ran."""
        self._supersede(shard)
        self.pending.append(shard)
        last = (shard.shard_ids[-1] + 1) * self.cfg.save_freq
        if last % self.cfg.merge_freq == 0:
            self.merge()
            return True
        return False

    def _supersede(self, shard: Memory) -> None:
        keys = {normalize_prompt(p): eid for eid, p in zip(shard.edit_ids, shard.prompts, strict=True)}
        # within the shard, an earlier edit of a prompt loses to the last one
        dup = {
            eid
            for eid, p in zip(shard.edit_ids, shard.prompts, strict=True)
            if keys[normalize_prompt(p)] != eid
        }
        old = {
            eid
            for m in self.memories()
            for eid, p in zip(m.edit_ids, m.prompts, strict=True)
            if normalize_prompt(p) in keys
        }
        gone = [e for m in self.memories() for e in m.drop(old)] + shard.drop(dup)
        if gone:
            logger.info("superseded %d edit(s) by later edits of the same prompt", len(gone))
            self.superseded += gone

    def retract(self, ids: Iterable[str]) -> list[str]:
        """Remove the edits ``ids`` from routing (and from the state's edit lists). Returns those found."""
        wanted = set(ids)
        gone = [e for m in self.memories() for e in m.drop(wanted)]
        self.retracted += gone
        return gone

    def merge(self) -> None:
        """Add the pending shards into their blocks (block ``j`` holds edits ``[j, j+1) x block_edits``)."""
        group = list(self.pending)
        if not group:
            return
        for shard in group:
            j = self.block_of(shard.shard_ids[0])
            while len(self.merged) <= j:
                self.merged.append(self._empty_block(shard))
        bases = {j: self.merged[j].delta for j in {self.block_of(s.shard_ids[0]) for s in group}}
        for shard in group:
            j = self.block_of(shard.shard_ids[0])
            block = self.merged[j]
            change = shard.delta.to(block.delta.device, block.delta.dtype) - bases[j]
            block.delta = block.delta + change
            block.edit_ids += shard.edit_ids
            block.prompts += shard.prompts
            block.targets += shard.targets
            block.shard_ids += shard.shard_ids
            block.columns = torch.cat([block.columns, shard.columns])  # type: ignore[list-item]
            block.relkeys = torch.cat([block.relkeys, shard.relkeys])  # type: ignore[list-item]
            block.subjects += shard.subjects
            if block.values is not None and shard.values is not None:
                block.values = torch.cat([block.values, shard.values])
            if self.on_merge is not None:
                self.on_merge([shard], None, block)
        self.pending = []
        logger.info(
            "merged %d shard(s) into %d block(s), %d edits", len(group), len(self.merged), self.n_edits()
        )

    @staticmethod
    def _empty_block(like: Memory) -> Memory:
        assert like.columns is not None and like.relkeys is not None
        return Memory(
            torch.zeros_like(like.delta),
            columns=like.columns[:0].clone(),
            relkeys=like.relkeys[:0].clone(),
            values=None if like.values is None else like.values[:0].clone(),
        )

    # ------------------------------------------------------------------ state
    def restore(self, pending: list[Memory], merged: list[Memory]) -> None:
        """Take the stored shards and blocks of a checkpoint."""
        self.pending, self.merged = list(pending), list(merged)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict = {"superseded": list(self.superseded), "retracted": list(self.retracted)}
        for kind, mems in (("pending", self.pending), ("merged", self.merged)):
            meta[kind] = []
            for i, m in enumerate(mems):
                tensors.update(m.tensors(f"{kind}.{i}"))
                meta[kind].append(m.meta())
        return tensors, meta

    def load(
        self,
        tensors: dict[str, torch.Tensor],
        meta: dict,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        self.pending = [
            Memory.from_state(tensors, f"pending.{i}", m, device, dtype)
            for i, m in enumerate(meta["pending"])
        ]
        self.merged = [
            Memory.from_state(tensors, f"merged.{i}", m, device, dtype) for i, m in enumerate(meta["merged"])
        ]
        self.superseded = list(meta.get("superseded", []))
        self.retracted = list(meta.get("retracted", []))


__all__ = ["KeyedBank"]
