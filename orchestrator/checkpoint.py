"""Crash-safe checkpoints of a running job (safetensors + JSON, never pickle).

Layout of ``checkpoint.dir``::

    checkpoint.json        the commit point: everything below that is part of the checkpoint, named
    journal.jsonl          every accepted edit record, in stream order (append-only, fsync'd before a commit)
    memories/*.safetensors side memories; a stored or merged memory is immutable, so it is written once;
                           the JSON metadata (edit ids, prompts, targets, threshold) rides in the file header

A commit fsyncs the journal, writes the new memory files (temp file, fsync, rename), then replaces
``checkpoint.json`` the same way and fsyncs the directory. A crash at any moment leaves the previous commit
intact; files written after it are unreferenced and collected by the next commit. On resume the journal is cut
back to the committed number of records: records read after the last commit are read again from the stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from wise.memory import Memory
from wise.state import atomic_write

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
META = "checkpoint.json"
JOURNAL = "journal.jsonl"
MEMORIES = "memories"


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or belongs to a different job."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def memory_name(mem: Memory, kind: str) -> str:
    """A file name that changes whenever the memory's content can: its role (``shard`` in progress,
    ``pending``, ``merged``), its shards and its number of edits."""
    first, last = mem.shard_ids[0], mem.shard_ids[-1]
    return f"{kind}-{first:07d}-{last:07d}-{len(mem.edit_ids):07d}.safetensors"


def fingerprint(job: dict[str, Any]) -> str:
    """Hash of what makes a checkpoint reusable: the edit source and the settings that shape the state."""
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


class CheckpointStore:
    """Reads and commits checkpoints in one directory.

    Args:
        directory: ``checkpoint.dir``.
        job: JSON-able description of the job (source, model, WISE settings); a checkpoint of another job in
            the same directory is refused rather than silently mixed in.
    """

    def __init__(self, directory: str | Path, job: dict[str, Any]) -> None:
        self.dir = Path(directory)
        self.job = job
        self.fingerprint = fingerprint(job)
        (self.dir / MEMORIES).mkdir(parents=True, exist_ok=True)
        self._journal = None
        self.commits = 0

    # ------------------------------------------------------------------ journal
    def open_journal(self, keep: int) -> list[dict]:
        """Cut the journal back to its first ``keep`` records, open it for appending, and return them.

        Raises:
            CheckpointError: the journal holds fewer records than the checkpoint says.
        """
        path = self.dir / JOURNAL
        records: list[dict] = []
        size = 0
        if path.exists():
            with open(path, "rb") as fh:
                for line in fh:
                    if len(records) == keep:
                        break
                    if not line.endswith(b"\n"):
                        break  # a torn last line: never committed
                    records.append(json.loads(line))
                    size += len(line)
        if len(records) < keep:
            raise CheckpointError(f"{path} holds {len(records)} records, the checkpoint needs {keep}")
        self._journal = open(path, "ab")  # noqa: SIM115 - kept open for the life of the job
        self._journal.truncate(size)
        return records

    def append(self, records: Iterable[dict]) -> None:
        """Append accepted records to the journal (made durable by the next commit)."""
        assert self._journal is not None, "open_journal() first"
        for r in records:
            self._journal.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")

    # ------------------------------------------------------------------ memories
    def write_memory(self, mem: Memory, kind: str) -> str:
        """Write ``mem`` (``kind``: shard | pending | merged) unless that file exists already; return its name."""
        name = memory_name(mem, kind)
        path = self.dir / MEMORIES / name
        if not path.exists():
            tensors = mem.tensors("delta")
            header = {"meta": json.dumps(mem.meta(), ensure_ascii=False)}
            atomic_write(path, lambda p: save_file(tensors, p, metadata=header))
        return name

    def read_memory(self, name: str) -> Memory:
        return read_memory_file(self.dir / MEMORIES / name)

    # ------------------------------------------------------------------ commit / load
    def commit(self, state: dict[str, Any]) -> None:
        """Make ``state`` (JSON-able; memory files already written) the checkpoint, atomically."""
        if self._journal is not None:
            self._journal.flush()
            os.fsync(self._journal.fileno())
        body = {"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint, "job": self.job, **state}
        atomic_write(
            self.dir / META, lambda p: Path(p).write_text(json.dumps(body, indent=1, ensure_ascii=False))
        )
        _fsync_dir(self.dir)
        self.commits += 1
        self._collect(state)

    def _collect(self, state: dict[str, Any]) -> None:
        """Delete memory files no longer referenced (after the commit that stopped referencing them)."""
        keep = set(_names(state))
        for f in (self.dir / MEMORIES).glob("*.safetensors"):
            if f.name not in keep:
                f.unlink(missing_ok=True)

    def load(self) -> dict[str, Any] | None:
        """The committed checkpoint, or None when the directory holds none.

        Raises:
            CheckpointError: unreadable, another format version, or another job's checkpoint.
        """
        path = self.dir / META
        if not path.exists():
            return None
        try:
            body = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON: {err}") from None
        if body.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"{path}: format version {body.get('version')} is not {CHECKPOINT_VERSION}")
        if body.get("fingerprint") != self.fingerprint:
            changed = sorted(k for k in self.job if body.get("job", {}).get(k) != self.job[k])
            raise CheckpointError(
                f"{path} belongs to another job (differs in {changed or 'its settings'}): set another "
                f"output.dir or checkpoint.dir, or delete {self.dir} to start over"
            )
        return body

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None


def read_memory_file(path: Path) -> Memory:
    """A memory written by :meth:`CheckpointStore.write_memory` (also read by ``wisestream serve``).

    Raises:
        CheckpointError: the file is missing.
    """
    if not path.is_file():
        raise CheckpointError(f"{path} is referenced by the checkpoint but missing")
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["meta"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return Memory.from_state(tensors, "delta", meta)


def _names(state: dict[str, Any]) -> list[str]:
    bank = state.get("bank", {})
    names = [*bank.get("pending", []), *bank.get("merged", [])]
    names += [s["memory"] for s in state.get("shards", []) if s.get("memory")]
    return names
