"""Carry a long benchmark run across machines whose work directories do not survive (a fresh checkout per
session, a CI runner, a preempted VM): :func:`pack` copies a run's work directory (its editor state, progress,
milestone copies kept for a deferred evaluation and the probes of evaluations part-way) into a directory that
can be committed, and :func:`unpack` rebuilds the work directory from it before the run resumes.

An editor state is one safetensors file that grows with every edit; packed, each memory (a merged block, a
pending shard, the active shard) is a file of its own, so a block that is full never changes again and a
version-controlled carry stores it once however often it is packed. Packing reads the work directory while the
run may still be writing it: a state whose edit count disagrees with ``progress.json`` is read again.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from orchestrator.config import ConfigError
from wise.state import META_FILE, TENSORS_FILE, atomic_write, read_state, write_state

logger = logging.getLogger(__name__)

MANIFEST = "carry.json"


def _memory_of(name: str) -> str:
    """The memory a state tensor belongs to: ``merged.3`` for ``merged.3.columns``, ``active`` for ``active``."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("pending", "merged") and len(parts) > 1 else parts[0]


def _pack_state(src: Path, dst: Path) -> None:
    tensors, meta = read_state(src)
    dst.mkdir(parents=True)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        groups.setdefault(_memory_of(name), {})[name] = t
    for memory, part in sorted(groups.items()):
        save_file(part, str(dst / f"{memory}.safetensors"))
    (dst / META_FILE).write_text(json.dumps(meta, indent=1))


def _unpack_state(src: Path, dst: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    write_state(dst, tensors, json.loads((src / META_FILE).read_text()))


def _copy_tree(src: Path, dst: Path, pack: bool) -> None:
    """Copy ``src`` into ``dst``: a directory holding an editor state is (un)packed, other files copied, hidden
    ones (the run's lock, atomic writes under way) skipped."""
    if src.name == "state" and (src / (TENSORS_FILE if pack else META_FILE)).is_file():
        (_pack_state if pack else _unpack_state)(src, dst)
        return
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            _copy_tree(p, dst / p.name, pack)
        else:
            shutil.copy2(p, dst / p.name)


def pack(work_dir: Path, carry_dir: Path, attempts: int = 5) -> int:
    """Pack ``work_dir`` into ``carry_dir`` (replacing what it held). Returns the edits in the packed state.

    Raises:
        ConfigError: ``work_dir`` holds no run, or its state and progress disagreed ``attempts`` times.
    """
    progress_path = work_dir / "progress.json"
    if not progress_path.is_file():
        raise ConfigError(f"{work_dir} holds no run to carry (no progress.json)")
    tmp = carry_dir.with_name(carry_dir.name + ".packing")
    for _ in range(attempts):
        shutil.rmtree(tmp, ignore_errors=True)
        applied = json.loads(progress_path.read_text())["applied"]
        _copy_tree(work_dir, tmp, pack=True)
        packed = json.loads((tmp / "progress.json").read_text())["applied"]
        in_state = json.loads((tmp / "state" / META_FILE).read_text())["n_edits"]
        if applied == packed == in_state:
            break
        time.sleep(1.0)  # the run checkpointed while we copied: again
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"{work_dir}: state and progress kept changing while packing; try again")
    manifest = {"edits": packed, "packed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write(tmp / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=1) + "\n"))
    old = carry_dir.with_name(carry_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if carry_dir.exists():
        carry_dir.rename(old)
    tmp.rename(carry_dir)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("packed %s (%d edits) into %s", work_dir, packed, carry_dir)
    return packed


def unpack(carry_dir: Path, work_dir: Path) -> int | None:
    """Rebuild ``work_dir`` from ``carry_dir`` when the work directory holds no run yet (a run there is newer
    and is never overwritten). Returns the edits restored, or None when nothing was restored."""
    if not (carry_dir / MANIFEST).is_file() or (work_dir / "progress.json").exists():
        return None
    tmp = work_dir.with_name(work_dir.name + ".unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    _copy_tree(carry_dir, tmp, pack=False)
    (tmp / MANIFEST).unlink()
    if work_dir.exists():  # an empty or lock-only directory
        shutil.rmtree(work_dir)
    work_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(work_dir)
    edits = json.loads((carry_dir / MANIFEST).read_text())["edits"]
    logger.info("restored %s (%d edits) from %s", work_dir, edits, carry_dir)
    return edits


__all__ = ["pack", "unpack"]
