"""Retractions: removing applied edits from the job's state, in stream order, exactly once.

A ``{"op": "retract", "id": ...}`` record read from the stream waits until every edit that precedes it in the
stream is stored in the bank, then drops the edit's routing keys (:meth:`wise.keyed.bank.KeyedBank.retract`);
no training runs. The retractions still waiting are part of every checkpoint (the read position is past
them), the applied ones are in the bank's ``retracted`` list: a resumed job neither loses nor repeats one.
:func:`retract_checkpoint` does the same to a stopped job's checkpoint (``wisestream retract``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.checkpoint import META, CheckpointError, CheckpointStore
from orchestrator.scheduler import ShardBook
from wise.config import WiseConfig
from wise.factory import make_bank
from wise.memory import MemoryBank

logger = logging.getLogger(__name__)


class RetractError(ValueError):
    """A retraction names edits that are not in the state (never applied, already retracted or superseded)."""


@dataclass(frozen=True)
class Pending:
    """A retraction read but not applied yet.

    Attributes:
        id: the edit to remove.
        after: accepted edits before it in the stream: it applies once that many are stored.
    """

    id: str
    after: int


class Retractions:
    """The job's retractions waiting for the edits before them to be stored.

    Args:
        pending: the waiting retractions of a checkpoint (:meth:`state`).

    Attributes:
        applied: retractions this run applied (the publisher publishes a new version when it changes).
    """

    def __init__(self, pending: Iterable[dict[str, Any]] = ()) -> None:
        self.pending = [Pending(p["id"], int(p["after"])) for p in pending]
        self.applied = 0

    def refusal(self, edit_id: str, seen_ids: set[str], bank: MemoryBank) -> str | None:
        """Why a retraction of ``edit_id`` is refused (dead-lettered), or None when it is queued."""
        if not hasattr(bank, "retract"):
            return f"retract: layout {bank.cfg.layout!r} cannot remove an edit (use wise.layout: keyed)"
        if edit_id in bank.retracted or any(p.id == edit_id for p in self.pending):
            return f"retract: edit {edit_id!r} is already retracted"
        if edit_id in bank.superseded:
            return f"retract: edit {edit_id!r} was superseded by a later edit of the same prompt"
        if edit_id not in seen_ids:
            return f"retract: edit {edit_id!r} was never applied"
        return None

    def add(self, edit_id: str, after: int) -> None:
        """Queue the retraction of ``edit_id``, read after ``after`` accepted edits."""
        self.pending.append(Pending(edit_id, after))

    def due(self, book: ShardBook) -> list[Pending]:
        """The waiting retractions whose preceding edits are all stored (``after`` <= stored edits)."""
        stored = book.next_store * book.save_freq
        return [p for p in self.pending if p.after <= stored]

    def apply(self, book: ShardBook, bank: MemoryBank, final: bool = False) -> list[str]:
        """Apply the due retractions, in stream order.

        Args:
            book: the shard book (how many edits are stored).
            bank: whose routing the edits leave.
            final: the stream has ended: a retraction whose edit is stored applies even if edits before it
                wait in the partial last shard (they are never stored in this run, and storing is all that
                could interact with it: a later edit of the same prompt superseding it).

        Returns:
            The ids removed.
        """
        due = self.due(book)
        if final:
            stored = set(bank.edit_ids())
            due += [p for p in self.pending if p not in due and p.id in stored]
        if not due:
            return []
        t0 = time.perf_counter()
        gone = bank.retract(p.id for p in due)
        self.pending = [p for p in self.pending if p not in due]
        self.applied += len(due)
        missed = sorted({p.id for p in due} - set(gone))
        if missed:  # a later edit of the same prompt, stored before the retraction was due, superseded it
            logger.info("retract: %s already superseded, nothing left to remove", missed)
        logger.info(
            "retracted %d edit(s) in %.2f ms (routing only, no retraining)",
            len(gone),
            1e3 * (time.perf_counter() - t0),
        )
        return gone

    def state(self) -> list[dict[str, Any]]:
        """The waiting retractions, JSON-able, for the checkpoint."""
        return [{"id": p.id, "after": p.after} for p in self.pending]


def retract_checkpoint(directory: str | Path, ids: Sequence[str]) -> dict[str, Any]:
    """Retract edits from a stopped job's checkpoint and commit the result as a new checkpoint.

    Only stored edits can be retracted this way (an edit of a shard under way is in no memory yet). Run it
    while the job is stopped: a running job would overwrite the checkpoint with its own state.

    Args:
        directory: the job's ``checkpoint.dir``.
        ids: edit ids to remove.

    Returns:
        ``{"retracted": [...], "edits": n_left, "checkpoint": path, "seconds": s}``.

    Raises:
        RetractError: some ids are not in the checkpoint's stored memories (nothing is written).
        CheckpointError: no checkpoint in ``directory``, or it is unreadable.
    """
    directory = Path(directory)
    meta_path = directory / META
    if not meta_path.is_file():
        raise CheckpointError(f"no checkpoint in {directory} ({META} is missing)")
    try:
        job = json.loads(meta_path.read_text())["job"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{meta_path} is not a job checkpoint: {err}") from None
    store = CheckpointStore(directory, job)
    ckpt = store.load()
    assert ckpt is not None
    t0 = time.perf_counter()
    bank = make_bank(WiseConfig.model_validate(job["wise"]))
    if not hasattr(bank, "retract"):
        raise RetractError(f"layout {bank.cfg.layout!r} cannot remove an edit (use wise.layout: keyed)")
    bank.restore(
        [store.read_memory(n) for n in ckpt["bank"]["pending"]],
        [store.read_memory(n) for n in ckpt["bank"]["merged"]],
    )
    bank.superseded = list(ckpt["bank"].get("superseded", []))
    bank.retracted = list(ckpt["bank"].get("retracted", []))
    wanted = list(dict.fromkeys(ids))
    stored = set(bank.edit_ids())
    unknown = [i for i in wanted if i not in stored]
    if unknown:
        raise RetractError(f"not in the checkpoint's stored edits (unknown or already removed): {unknown}")
    gone = bank.retract(wanted)
    state = {k: v for k, v in ckpt.items() if k not in ("version", "fingerprint", "job")}
    state["time"] = time.time()
    state["bank"] = {
        "pending": [store.write_memory(m, "pending") for m in bank.pending],
        "merged": [store.write_memory(m, "merged") for m in bank.merged],
        "superseded": list(bank.superseded),
        "retracted": list(bank.retracted),
    }
    store.commit(state)
    return {
        "retracted": gone,
        "edits": bank.n_edits(),
        "checkpoint": str(meta_path),
        "seconds": time.perf_counter() - t0,
    }


__all__ = ["Pending", "RetractError", "Retractions", "retract_checkpoint"]
