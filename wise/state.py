"""The on-disk format of a WISE editor state: one safetensors file for the tensors, one JSON file for
everything else. Never pickle (``torch.load`` of an untrusted file executes code). Writes are atomic: each file
goes to a temporary name, is fsync'd, then renamed, so a crash leaves the previous state intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

STATE_VERSION = 3
TENSORS_FILE = "wise_state.safetensors"
META_FILE = "wise_state.json"


class StateError(ValueError):
    """A saved state is missing or does not match this editor (model shape, config, or format version)."""


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_state(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` and ``meta`` into ``directory`` atomically; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / TENSORS_FILE, lambda p: save_file(tensors, p))
    atomic_write(directory / META_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    return directory


def read_state(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a state written by :func:`write_state`.

    Raises:
        StateError: the directory does not hold both files.
    """
    directory = Path(directory)
    if not (directory / TENSORS_FILE).is_file() or not (directory / META_FILE).is_file():
        raise StateError(f"{directory} holds no WISE state ({TENSORS_FILE} + {META_FILE})")
    return load_file(directory / TENSORS_FILE), json.loads((directory / META_FILE).read_text())


class _Bank(Protocol):
    def state(self) -> tuple[dict[str, torch.Tensor], dict]: ...

    def n_edits(self) -> int: ...


class _Shard(Protocol):
    edit_ids: list[str]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]: ...

    def meta(self) -> dict: ...


def compose_state(
    cfg: Any,
    module_path: str,
    weight_shape: Sequence[int],
    setup: dict,
    bank: _Bank,
    active: _Shard,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The editor state (tensors, JSON metadata) of a memory bank plus the active shard, for either layout.

    Args:
        cfg: the :class:`~wise.config.WiseConfig` the state was produced with.
        module_path: the edited projection, e.g. ``model.layers.23.mlp.down_proj``.
        weight_shape: its weight's shape.
        setup: what replicas share (``templates`` plus ``margins`` or ``center``), from the trainer's
            ``setup_state()``.
        bank: stored and merged memories (:class:`~wise.memory.MemoryBank` or
            :class:`~wise.keyed.bank.KeyedBank`).
        active: the shard being trained (possibly empty).
    """
    tensors, bank_meta = bank.state()
    tensors.update(active.tensors("active"))
    meta = {
        "version": STATE_VERSION,
        "config": cfg.model_dump(mode="json"),
        "module_path": module_path,
        "weight_shape": list(weight_shape),
        "n_edits": bank.n_edits() + len(active.edit_ids),
        **setup,
        "active": active.meta(),
        **bank_meta,
    }
    return tensors, meta


def check_state(meta: dict, module_path: str, weight_shape: Sequence[int], cfg: Any) -> None:
    """Refuse a state that another editor wrote: other format version, edited module, shape or settings.

    Raises:
        StateError: naming what differs.
    """
    if meta.get("version") != STATE_VERSION:
        raise StateError(f"state format version {meta.get('version')} is not {STATE_VERSION}")
    if meta["module_path"] != module_path or list(weight_shape) != meta["weight_shape"]:
        raise StateError(
            f"state edits {meta['module_path']} {meta['weight_shape']}, this editor "
            f"{module_path} {list(weight_shape)}"
        )
    saved = type(cfg).model_validate(meta["config"])
    if saved != cfg:
        diff = sorted(k for k, v in saved.model_dump().items() if cfg.model_dump()[k] != v)
        raise StateError(f"state was written with different wise settings: {diff}")
