"""Edit-record ingestion for wisestream: parse, validate and stream knowledge edits.

Sources (JSON/JSON Lines in ZsRE, CounterFact or canonical layout, Parquet, local HF datasets, or any
Python iterable) yield :class:`EditRecord` s; :class:`EditStream` hands out the valid ones with their
positions for checkpoint/resume and dead-letters the rest. This package imports neither torch nor ray.
"""

from streams.deadletter import DeadLetter, DeadLetterFile, read_dead_letters
from streams.errors import FormatError, InvalidRecordError, Issue, SourceError, StreamError
from streams.layouts import LAYOUTS, detect_layout
from streams.record import EditRecord, PortabilityProbe, RecordLimits, parse_record
from streams.source_base import EditSource, SourceItem
from streams.sources import FORMATS, IterableSource, open_source
from streams.stream import EditStream

__all__ = [
    "FORMATS",
    "LAYOUTS",
    "DeadLetter",
    "DeadLetterFile",
    "EditRecord",
    "EditSource",
    "EditStream",
    "FormatError",
    "InvalidRecordError",
    "Issue",
    "IterableSource",
    "PortabilityProbe",
    "RecordLimits",
    "SourceError",
    "SourceItem",
    "StreamError",
    "detect_layout",
    "open_source",
    "parse_record",
    "read_dead_letters",
]
