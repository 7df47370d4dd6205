"""Edit-record ingestion for wisestream: parse, validate and stream knowledge edits.

Sources (JSON/JSON Lines in ZsRE, CounterFact or canonical layout, Parquet, local HF datasets, or any
Python iterable) yield :class:`EditRecord` s (and :class:`RetractRecord` s, ``{"op": "retract", "id": ...}``); :class:`EditStream` hands out the valid ones with their
positions for checkpoint/resume and dead-letters the rest. A Kafka topic of canonical JSON records is read
by :class:`KafkaEditConsumer` (consumer group, manual commits, dead-letter topic) and filled from any
supported file by :func:`produce_records`. This package imports neither torch nor ray.
"""

from streams.deadletter import DeadLetter, DeadLetterFile, read_dead_letters
from streams.errors import FormatError, InvalidRecordError, Issue, SourceError, StreamError
from streams.kafka import (
    HEADER_REASON,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    KafkaItem,
    KafkaSettings,
    KafkaStreamError,
    create_topics,
    next_offsets,
)
from streams.kafka_consumer import KafkaEditConsumer
from streams.kafka_produce import DeadLetterProducer, produce_records
from streams.layouts import LAYOUTS, detect_layout
from streams.record import (
    EditRecord,
    PortabilityProbe,
    RecordLimits,
    RetractRecord,
    StreamRecord,
    parse_record,
)
from streams.source_base import EditSource, SourceItem
from streams.sources import FORMATS, IterableSource, open_source
from streams.stream import EditStream

__all__ = [
    "FORMATS",
    "HEADER_REASON",
    "HEADER_SOURCE_OFFSET",
    "HEADER_SOURCE_PARTITION",
    "HEADER_SOURCE_TOPIC",
    "LAYOUTS",
    "DeadLetter",
    "DeadLetterProducer",
    "DeadLetterFile",
    "EditRecord",
    "EditSource",
    "EditStream",
    "FormatError",
    "InvalidRecordError",
    "Issue",
    "IterableSource",
    "KafkaEditConsumer",
    "KafkaItem",
    "KafkaSettings",
    "KafkaStreamError",
    "PortabilityProbe",
    "RecordLimits",
    "RetractRecord",
    "SourceError",
    "SourceItem",
    "StreamError",
    "StreamRecord",
    "create_topics",
    "detect_layout",
    "next_offsets",
    "open_source",
    "parse_record",
    "produce_records",
    "read_dead_letters",
]
