"""``import streams`` must stay free of torch and ray (it runs in light ingestion processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_import_does_not_pull_torch_or_ray() -> None:
    code = "import streams, sys; assert 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_public_names_exported() -> None:
    import streams

    for name in (
        "EditRecord",
        "RecordLimits",
        "parse_record",
        "InvalidRecordError",
        "FormatError",
        "SourceError",
        "open_source",
        "IterableSource",
        "EditStream",
        "DeadLetterFile",
        "SourceItem",
        "FORMATS",
        "LAYOUTS",
    ):
        assert hasattr(streams, name), name
    assert set(streams.FORMATS) == {"auto", "zsre", "counterfact", "jsonl", "parquet", "hf"}
    assert set(streams.LAYOUTS) == {"zsre", "counterfact", "canonical"}
