"""Opening edit sources: the format registry, ``auto`` detection and programmatic ingestion.

Formats (``open_source(path, format=...)``):

* ``zsre`` / ``counterfact``: a JSON list in that layout (JSON Lines when the file is ``.jsonl``).
* ``jsonl``: JSON Lines of canonical records.
* ``parquet``: Parquet with canonical, ZsRE or CounterFact columns (detected).
* ``hf``: a local .json/.jsonl/.csv/.parquet file or a ``save_to_disk`` directory, via ``datasets``.
* ``auto``: chosen from the extension and, for JSON, from the keys of the first rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from streams.errors import FormatError, SourceError
from streams.file_sources import JsonListSource, JsonlSource, ParquetSource
from streams.hf_source import HFSource
from streams.layouts import get_layout
from streams.record import RecordLimits
from streams.source_base import EditSource, SourceItem, check_start, item_from_any

logger = logging.getLogger(__name__)

_DEFAULT_LIMITS = RecordLimits()

Opener = Callable[[Path, RecordLimits, "str | Path | None"], EditSource]


class IterableSource(EditSource):
    """Programmatic ingestion from any iterable (a list, or a generator reading the user's own system).

    Items may be mappings (in ``layout``), :class:`~streams.record.EditRecord` s or JSON strings;
    anything else is a rejected item. Positions are indices in the iterable.

    A one-shot iterator (a generator) can be read only once: ``read(start)`` consumes and drops its
    first ``start`` items, and a second ``read`` raises :class:`SourceError`. Re-iterable inputs
    (lists, tuples, ...) can be read any number of times.

    Args:
        iterable: The items.
        name: Origin written into dead letters.
        layout: Layout of mapping / JSON items (default canonical).
        limits: Record limits.

    Raises:
        FormatError: Unknown ``layout``.
    """

    def __init__(
        self,
        iterable: Iterable[Any],
        name: str = "python",
        *,
        layout: str = "canonical",
        limits: RecordLimits = _DEFAULT_LIMITS,
    ) -> None:
        get_layout(layout)
        super().__init__(name, "python", layout, limits)
        self._iterable = iterable
        self._one_shot = iter(iterable) is iterable
        self._consumed = False

    def read(self, start: int = 0) -> Iterator[SourceItem]:
        """Yield the items at positions ``>= start`` (see :meth:`EditSource.read`).

        Raises:
            SourceError: A one-shot iterator is read a second time.
        """
        check_start(start)
        if self._one_shot:
            if self._consumed:
                raise SourceError(
                    f"source {self.name!r} wraps a one-shot iterator that was already read; "
                    "pass a list or a fresh generator to read it again"
                )
            self._consumed = True
        return self._items(start)

    def _items(self, start: int) -> Iterator[SourceItem]:
        for position, value in enumerate(self._iterable):
            if position >= start:
                yield item_from_any(position, value, layout=self.layout, limits=self.limits)


def _not_a_directory(path: Path, format: str) -> None:
    if path.is_dir():
        raise FormatError(
            f"{path} is a directory; format {format!r} reads a file (use format='hf' for saved datasets)"
        )


def _open_layout_file(path: Path, limits: RecordLimits, layout: str) -> EditSource:
    _not_a_directory(path, layout)
    if path.suffix.lower() == ".jsonl":
        return JsonlSource(path, layout=layout, limits=limits, format=layout)
    return JsonListSource(path, layout=layout, limits=limits, format=layout)


def _open_zsre(path: Path, limits: RecordLimits, cache_dir: str | Path | None) -> EditSource:
    return _open_layout_file(path, limits, "zsre")


def _open_counterfact(path: Path, limits: RecordLimits, cache_dir: str | Path | None) -> EditSource:
    return _open_layout_file(path, limits, "counterfact")


def _open_jsonl(path: Path, limits: RecordLimits, cache_dir: str | Path | None) -> EditSource:
    _not_a_directory(path, "jsonl")
    return JsonlSource(path, layout="canonical", limits=limits, format="jsonl")


def _open_parquet(path: Path, limits: RecordLimits, cache_dir: str | Path | None) -> EditSource:
    _not_a_directory(path, "parquet")
    return ParquetSource(path, layout=None, limits=limits, format="parquet")


def _open_hf(path: Path, limits: RecordLimits, cache_dir: str | Path | None) -> EditSource:
    return HFSource(path, limits=limits, format="hf", cache_dir=cache_dir)


def _open_auto(path: Path, limits: RecordLimits, cache_dir: str | Path | None) -> EditSource:
    if path.is_dir():
        return _open_hf(path, limits, cache_dir)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _open_parquet(path, limits, cache_dir)
    if suffix == ".jsonl":
        source: EditSource = JsonlSource(path, layout=None, limits=limits, format="jsonl")
    elif suffix == ".json":
        source = JsonListSource(path, layout=None, limits=limits, format="json")
    elif suffix == ".csv":
        return _open_hf(path, limits, cache_dir)
    else:
        raise FormatError(
            f"cannot infer the format of {path} from its extension {suffix!r} "
            f"(auto knows .json, .jsonl, .parquet, .csv and directories); pass format= one of {sorted(FORMATS)}"
        )
    # Report the layout as the format name so logs and dead letters say "zsre", not "json".
    if source.layout in {"zsre", "counterfact"}:
        source.format = source.layout
    logger.info("auto-detected %s as format=%s layout=%s", path, source.format, source.layout)
    return source


FORMATS: Mapping[str, Opener] = MappingProxyType(
    {
        "auto": _open_auto,
        "zsre": _open_zsre,
        "counterfact": _open_counterfact,
        "jsonl": _open_jsonl,
        "parquet": _open_parquet,
        "hf": _open_hf,
    }
)


def open_source(
    path: str | Path,
    format: str = "auto",
    *,
    limits: RecordLimits = _DEFAULT_LIMITS,
    cache_dir: str | Path | None = None,
) -> EditSource:
    """Open a local file or directory of edit records.

    Args:
        path: The file (or, for ``hf``/``auto``, a ``save_to_disk`` directory).
        format: A key of :data:`FORMATS`.
        limits: Record limits enforced on every row.
        cache_dir: Arrow cache directory for the ``hf`` format (ignored by the others).

    Returns:
        The source; iterate it or call ``read(start)``.

    Raises:
        FormatError: Unknown format (the message lists the choices), or the file as a whole cannot be
            parsed in that format (not JSON, not a list, no known layout, ...).
        SourceError: The path does not exist or cannot be read.
    """
    opener = FORMATS.get(format)
    if opener is None:
        raise FormatError(f"unknown source format {format!r}; choose one of {sorted(FORMATS)}")
    path = Path(path).expanduser()
    if not path.exists():
        where = "" if path.is_absolute() else f" (a relative path starts at {Path.cwd()})"
        raise SourceError(f"edit source not found: {path}{where}; check the path")
    return opener(path, limits, cache_dir)
