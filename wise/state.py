"""The on-disk format of a WISE editor state: one safetensors file for the tensors, one JSON file for
everything else. Never pickle (``torch.load`` of an untrusted file executes code). Writes are atomic: each file
goes to a temporary name, is fsync'd, then renamed, so a crash leaves the previous state intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_VERSION = 2
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
