"""Side memories and the bank that stores and merges them (paper Sec. 2.3.2; Algorithm 1 lines 9-14).

A :class:`Memory` is one side memory: its task vector ``Delta = W' - W`` plus the edits written into it and
their routing keys (the edited projection's inputs over each edit prompt). Keys make thresholds a pure tensor
computation, so merging needs no model: the orchestrator can merge shards trained by other processes.

The :class:`MemoryBank` stores closed shards and merges them every ``merge_freq`` edits: into one memory
(WISE-Merge, whose new shards start from that memory) or into a new memory appended to a list (WISE-Retrieve,
whose shards all start from the main memory).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from wise.config import WiseConfig
from wise.merge import get_merger
from wise.router import reduce_span, token_activation

logger = logging.getLogger(__name__)


@dataclass
class Memory:
    """One side memory: its task vector, its edits, and their routing keys.

    The shards layout routes on ``threshold`` and keeps each edit's prompt activations in ``keys``; the keyed
    layout (:mod:`wise.keyed`) keeps, per edit, the memory columns it wrote (``columns``), its relation key
    (``relkeys``) and the token ids of its subject (``subjects``).
    """

    delta: torch.Tensor  # (d_out, d_in): side - main
    edit_ids: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    shard_ids: list[int] = field(default_factory=list)
    threshold: float = float("inf")
    keys: list[torch.Tensor] = field(default_factory=list)  # per edit (p_i, d_in) float16 on CPU; may be []
    columns: torch.Tensor | None = None  # keyed: (E, k) long, the columns each edit writes
    relkeys: torch.Tensor | None = None  # keyed: (E, r) float16 unit relation keys
    subjects: list[list[list[int]]] = field(
        default_factory=list
    )  # keyed: per edit its subject token variants
    values: torch.Tensor | None = None  # keyed with values: (E, d_out) float16, each edit's own output vector

    def meta(self) -> dict:
        out = {
            "edit_ids": self.edit_ids,
            "prompts": self.prompts,
            "targets": self.targets,
            "shard_ids": self.shard_ids,
            "threshold": self.threshold,
            "keys": len(self.keys),
        }
        if self.columns is not None:
            out["subjects"] = self.subjects
        return out

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The memory's tensors under ``prefix`` (for safetensors)."""
        out = {prefix: self.delta.detach().contiguous().cpu()}
        for i, k in enumerate(self.keys):
            out[f"{prefix}.key.{i}"] = k.contiguous()
        if self.columns is not None and self.relkeys is not None:
            out[f"{prefix}.columns"] = self.columns.to(torch.int32).contiguous().cpu()
            out[f"{prefix}.relkeys"] = self.relkeys.to(torch.float16).contiguous().cpu()
        if self.values is not None:
            out[f"{prefix}.values"] = self.values.to(torch.float16).contiguous().cpu()
        return out

    def drop(self, ids: set[str]) -> list[str]:
        """Remove the edits in ``ids`` from this memory's edit list and routing keys (its task vector keeps
        what they wrote). Returns the ids removed, in order."""
        keep = [i for i, e in enumerate(self.edit_ids) if e not in ids]
        gone = [e for e in self.edit_ids if e in ids]
        if not gone:
            return []
        self.edit_ids = [self.edit_ids[i] for i in keep]
        self.prompts = [self.prompts[i] for i in keep]
        self.targets = [self.targets[i] for i in keep]
        if self.keys:
            self.keys = [self.keys[i] for i in keep]
        if self.columns is not None and self.relkeys is not None:
            index = torch.tensor(keep, dtype=torch.long)
            self.columns = self.columns[index]
            self.relkeys = self.relkeys[index]
            self.subjects = [self.subjects[i] for i in keep]
            if self.values is not None:
                self.values = self.values[index]
        return gone

    @classmethod
    def from_state(
        cls,
        tensors: dict[str, torch.Tensor],
        prefix: str,
        meta: dict,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Memory:
        """Rebuild a memory written by :meth:`tensors` / :meth:`meta`."""
        delta = tensors[prefix]
        keyed = f"{prefix}.columns" in tensors
        return cls(
            delta.to(device, dtype or delta.dtype),
            list(meta["edit_ids"]),
            list(meta["prompts"]),
            list(meta["targets"]),
            list(meta["shard_ids"]),
            float(meta["threshold"]),
            [tensors[f"{prefix}.key.{i}"] for i in range(int(meta.get("keys", 0)))],
            tensors[f"{prefix}.columns"].long() if keyed else None,
            tensors[f"{prefix}.relkeys"] if keyed else None,
            [[list(v) for v in s] for s in meta.get("subjects", [])] if keyed else [],
            tensors.get(f"{prefix}.values"),
        )

    def detached(self) -> Memory:
        """A CPU copy that shares nothing with this memory (for shipping to another process)."""
        return Memory(
            self.delta.detach().cpu().clone(),
            list(self.edit_ids),
            list(self.prompts),
            list(self.targets),
            list(self.shard_ids),
            self.threshold,
            [k.clone() for k in self.keys],
            None if self.columns is None else self.columns.clone(),
            None if self.relkeys is None else self.relkeys.clone(),
            [[list(v) for v in s] for s in self.subjects],
            None if self.values is None else self.values.clone(),
        )


def edit_scores(memory: Memory, transposed: bool, reduce: str) -> torch.Tensor:
    """Routing score of ``memory`` on each of its own edit prompts (Eq. 4 with the empty template): (n,).

    Raises:
        ValueError: the memory has edits but no keys (they were dropped after a WISE-Retrieve merge).
    """
    if not memory.edit_ids:
        return torch.zeros(0)
    if len(memory.keys) != len(memory.edit_ids):
        raise ValueError(f"memory of shards {memory.shard_ids} holds no routing keys for its edits")
    return key_scores(memory.delta, memory.keys, transposed, reduce)


def key_scores(delta: torch.Tensor, keys: list[torch.Tensor], transposed: bool, reduce: str) -> torch.Tensor:
    """Routing score of ``delta`` on each prompt from its keys (its edited-projection inputs, (p_i, d_in)): (n,)."""
    scores = [
        reduce_span(
            token_activation(k.to(delta.device, delta.dtype).unsqueeze(0), delta, transposed).float(),
            None,
            reduce,
        )[0]
        for k in keys
    ]
    return torch.stack(scores)


def refresh_threshold(memory: Memory, cfg: WiseConfig, transposed: bool) -> None:
    """Threshold = ``act_ratio`` x the lowest routing score among the memory's own edits (paper Sec. 2.3.1)."""
    scores = edit_scores(memory, transposed, cfg.router_reduce)
    memory.threshold = cfg.act_ratio * float(scores.min()) if scores.numel() else float("inf")


class MemoryBank:
    """Stored shards (``pending``) and merged memories (``merged``), with the merge cadence.

    Args:
        cfg: WISE settings (``save_freq``, ``merge_freq``, ``retrieve``, ``merge``, ``act_ratio``).
        transposed: the edited weight is stored (in, out) (GPT-2's Conv1D).

    Attributes:
        on_merge: called after every merge with the merged group's shards, the task vector they started from
            (None: the main memory) and the new merged memory; for diagnostics (``wisestream bench merges``).
    """

    def __init__(self, cfg: WiseConfig, transposed: bool = False) -> None:
        self.cfg = cfg
        self.transposed = transposed
        self.pending: list[Memory] = []
        self.merged: list[Memory] = []
        self.superseded: list[str] = []  # the shards layout never removes an edit (see wise.keyed.bank)
        self.retracted: list[str] = []
        self.on_merge: Callable[[list[Memory], torch.Tensor | None, Memory], None] | None = None

    def restore(self, pending: list[Memory], merged: list[Memory]) -> None:
        """Continue from stored shards (``pending``) and merged memories saved earlier (a checkpoint)."""
        self.pending = pending
        self.merged = merged

    def memories(self) -> list[Memory]:
        """Merged then pending memories: the router's order."""
        return [*self.merged, *self.pending]

    def edit_ids(self) -> list[str]:
        return [eid for m in self.memories() for eid in m.edit_ids]

    def n_edits(self) -> int:
        return sum(len(m.edit_ids) for m in self.memories())

    def store(self, shard: Memory) -> bool:
        """Store a closed shard, then merge if the cadence says so. Shards must arrive in stream order.

        Returns:
            True when the shard completed a merge group (a merge ran).
        """
        self.pending.append(shard)
        if self.n_edits() % self.cfg.merge_freq == 0:
            self.merge()
            return True
        return False

    def base(self) -> torch.Tensor | None:
        """The task vector a new shard starts from: WISE-Merge's merged memory, None for the main memory.

        WISE-Retrieve shards always start from the main memory: each merge group becomes its own memory.
        """
        if self.cfg.retrieve or not self.merged:
            return None
        return self.merged[0].delta

    def startable(self, shard_id: int, next_store: int) -> bool:
        """Whether a fresh shard can start training once the shards before ``next_store`` are stored: always
        for WISE-Retrieve; for WISE-Merge, once its merge group's base (the earlier groups' merge) exists."""
        return self.cfg.retrieve or self.first_of_group(shard_id) <= next_store

    def first_of_group(self, shard_id: int) -> int:
        """The first shard of ``shard_id``'s merge group (shards of one group start from the same base)."""
        per_group = self.cfg.merge_freq // self.cfg.save_freq
        return shard_id // per_group * per_group

    def merge(self) -> None:
        """Merge the stored shards (TIES by default) into the single merged memory (WISE-Merge), or into a new
        memory appended to the bank (WISE-Retrieve). Thresholds are re-measured on the merged memory.

        WISE-Merge follows the paper (Sec. 2.3.2): the shards of a group all start from the merged memory ``M``
        of the earlier groups (:meth:`base`) and each writes its edits into its own subspace, so the merge is
        ``M + TIES(shard_1 - M, ..., shard_k - M)``: the earlier merges are not trimmed again. A group of one
        shard is the shard itself. WISE-Retrieve merges each group on its own (``M = 0``).
        """
        group = list(self.pending)
        if not group:
            return
        base = self.base()
        earlier = [] if base is None else list(self.merged)
        if len(group) == 1:
            delta = group[0].delta
        else:
            merger = get_merger(self.cfg.merge.method)
            opts = {"density": self.cfg.merge.density, "weight": self.cfg.merge.weights}
            if base is None:
                delta = merger([m.delta for m in group], **opts)
            else:
                delta = base + merger([m.delta - base for m in group], **opts)
        merged = Memory(delta)
        for m in [*earlier, *group]:
            merged.edit_ids += m.edit_ids
            merged.prompts += m.prompts
            merged.targets += m.targets
            merged.shard_ids += m.shard_ids
            merged.keys += m.keys
        refresh_threshold(merged, self.cfg, self.transposed)
        logger.info(
            "%s (%d edits), threshold %.3f",
            f"merged {len(group)} shards"
            if len(group) > 1
            else f"shard {group[0].shard_ids} kept as a memory",
            len(merged.edit_ids),
            merged.threshold,
        )
        if self.cfg.retrieve:
            # A WISE-Retrieve memory is never merged again: its keys are not needed any more.
            merged.keys = []
            self.merged = [*self.merged, merged]
        else:
            self.merged = [merged]
        self.pending = []
        if self.on_merge is not None:
            self.on_merge(group, base, merged)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict = {}
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
