"""Edit source backed by the Hugging Face ``datasets`` library, for local files only.

Files are loaded with the packaged builders (``Dataset.from_json`` / ``from_csv`` / ``from_parquet``,
the same readers ``load_dataset("json" | "csv" | "parquet", data_files=...)`` uses) and directories
with ``load_from_disk``. ``load_dataset`` itself is avoided on purpose: even for local files it pings
the Hub to count downloads unless offline mode was set before ``datasets`` was imported, and flipping
that global would also change how the rest of the process loads models. The builders used here never
touch the network.

``datasets`` is imported lazily so that ``import streams`` stays light.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pyarrow as pa

from streams.errors import FormatError, SourceError
from streams.layouts import detect_layout, get_layout
from streams.record import RecordLimits
from streams.source_base import EditSource, SourceItem, check_start, item_from_row

logger = logging.getLogger(__name__)

# Extension -> packaged builder; plain text has no notion of a record and is not supported.
HF_BUILDERS: Mapping[str, str] = MappingProxyType(
    {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
)
_BATCH = 1000
_PREFERRED_SPLIT = "train"


def _load(path: Path, cache_dir: str | Path | None) -> Any:
    import datasets  # lazy: heavy import, only needed for this format

    cache = None if cache_dir is None else str(cache_dir)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            splits = sorted(loaded)
            if _PREFERRED_SPLIT in loaded:
                return loaded[_PREFERRED_SPLIT]
            if len(splits) == 1:
                return loaded[splits[0]]
            raise FormatError(
                f"{path} holds splits {splits} and none is {_PREFERRED_SPLIT!r}; save the one to edit"
            )
        return loaded
    builder = HF_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise FormatError(
            f"{path}: extension {path.suffix!r} is not supported by format 'hf'; use one of {sorted(HF_BUILDERS)} "
            "or a directory written by Dataset.save_to_disk"
        )
    readers = {
        "json": datasets.Dataset.from_json,
        "csv": datasets.Dataset.from_csv,
        "parquet": datasets.Dataset.from_parquet,
    }
    return readers[builder](str(path), split="train", cache_dir=cache)


class HFSource(EditSource):
    """A local dataset loaded with Hugging Face ``datasets``; the layout is detected from its columns.

    ``datasets`` infers one schema for the whole file, so a file with wrongly typed rows fails as a
    whole (:class:`FormatError`); use the ``jsonl`` format to dead-letter such rows one by one.
    Null cells count as absent fields.

    Args:
        path: A .json/.jsonl/.csv/.parquet file, or a directory written by ``save_to_disk``.
        limits: Record limits.
        format: Registry name reported in :attr:`format`.
        cache_dir: Where ``datasets`` writes its Arrow cache for files (default: its own cache).

    Raises:
        SourceError: The file cannot be read.
        FormatError: ``datasets`` cannot load it, or its columns match no layout.
    """

    def __init__(
        self,
        path: Path,
        *,
        limits: RecordLimits,
        format: str = "hf",
        cache_dir: str | Path | None = None,
    ) -> None:
        from datasets.exceptions import DatasetsError

        try:
            dataset = _load(path, cache_dir)
        except FormatError:
            raise
        except FileNotFoundError as exc:
            raise SourceError(f"cannot read {path}: {exc}") from exc
        except (DatasetsError, pa.ArrowException, ValueError, OSError) as exc:
            raise FormatError(f"datasets cannot load {path}: {type(exc).__name__}: {exc}") from exc
        # A dataset saved with a torch/numpy format would hand back tensors (and import torch).
        dataset = dataset.with_format(None)
        try:
            layout = detect_layout(dict.fromkeys(dataset.column_names))
        except FormatError as exc:
            raise FormatError(f"{path}: {exc}") from None
        get_layout(layout)
        super().__init__(str(path), format, layout, limits)
        self._dataset = dataset

    @property
    def num_items(self) -> int | None:
        """Number of rows in the dataset."""
        return len(self._dataset)

    def read(self, start: int = 0) -> Iterator[SourceItem]:
        """Yield the rows at positions ``>= start`` (see :meth:`EditSource.read`)."""
        check_start(start)
        total = len(self._dataset)
        for begin in range(start, total, _BATCH):
            columns = self._dataset[begin : begin + _BATCH]
            names = list(columns)
            for offset, values in enumerate(zip(*(columns[name] for name in names), strict=True)):
                row = dict(zip(names, values, strict=True))
                yield item_from_row(
                    begin + offset, row, layout=self.layout, limits=self.limits, nulls_are_absent=True
                )
