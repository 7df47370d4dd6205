"""The pieces of each memory layout by name (``wise.layout``): the single-process editor, the trainer an
editor actor holds, and the memory bank the job stores shards in. Callers never branch on the layout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from wise.config import WiseConfig
from wise.memory import Memory


def make_editor(
    model: nn.Module,
    tokenizer,
    cfg: WiseConfig,
    irrelevant: Sequence[tuple[str, str]] = (),
    engine: str = "cached",
) -> Any:
    """A :class:`~wise.keyed.editor.KeyedEditor` or a :class:`~wise.editor.WiseEditor`, by ``cfg.layout``."""
    if cfg.layout == "keyed":
        from wise.keyed.editor import KeyedEditor

        return KeyedEditor(model, tokenizer, cfg, irrelevant, engine)
    from wise.editor import WiseEditor

    return WiseEditor(model, tokenizer, cfg, irrelevant, engine)


def make_trainer(
    model: nn.Module,
    tokenizer,
    cfg: WiseConfig,
    irrelevant: Sequence[tuple[str, str]] = (),
    engine: str = "cached",
) -> Any:
    """A :class:`~wise.keyed.trainer.KeyedTrainer` or a :class:`~wise.trainer.ShardTrainer`."""
    if cfg.layout == "keyed":
        from wise.keyed.trainer import KeyedTrainer

        return KeyedTrainer(model, tokenizer, cfg, irrelevant, engine)
    from wise.trainer import ShardTrainer

    return ShardTrainer(model, tokenizer, cfg, irrelevant, engine)


def empty_shard(cfg: WiseConfig, shape: Sequence[int], dtype: torch.dtype, shard_id: int) -> Memory:
    """A shard holding no edit, as the layout's trainer creates it (the job's placeholder active shard)."""
    delta = torch.zeros(tuple(shape), dtype=dtype)
    if cfg.layout == "keyed":
        return Memory(
            delta,
            shard_ids=[shard_id],
            columns=torch.zeros(0, cfg.keyed.columns, dtype=torch.long),
            relkeys=torch.zeros(0, cfg.keyed.relation_dim, dtype=torch.float16),
            values=torch.zeros(0, delta.shape[0], dtype=torch.float16) if cfg.keyed.values else None,
        )
    return Memory(delta, shard_ids=[shard_id])


def make_bank(cfg: WiseConfig, transposed: bool = False) -> Any:
    """A :class:`~wise.keyed.bank.KeyedBank` or a :class:`~wise.memory.MemoryBank`."""
    if cfg.layout == "keyed":
        from wise.keyed.bank import KeyedBank

        return KeyedBank(cfg, transposed)
    from wise.memory import MemoryBank

    return MemoryBank(cfg, transposed)


__all__ = ["empty_shard", "make_bank", "make_editor", "make_trainer"]
