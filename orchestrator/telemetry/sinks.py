"""Where continuous retention measurements go: logged and appended to a JSONL file next to the report, and
(through :class:`FanoutSink`) to the job's Prometheus metrics (:class:`orchestrator.telemetry.metrics.JobMetrics`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

from orchestrator.report import format_number

logger = logging.getLogger(__name__)


class MetricsSink(Protocol):
    def record(self, measurement: dict[str, Any]) -> None:
        """Take one measurement: retention (``edits``, ``reliability``, ``generalization``, ``locality``, ...)
        or, for a Kafka stream, consumer lag (``kind: "lag"``, ``edits``, ``lag`` = messages not yet
        checkpointed per ``topic[partition]``, ``lag_total``)."""


class JsonlSink:
    """Log each measurement and append it to a JSON Lines file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, measurement: dict[str, Any]) -> None:
        if measurement.get("kind") == "lag":
            logger.info(
                "consumer lag %d after %d edits: %s",
                measurement["lag_total"],
                measurement["edits"],
                measurement["lag"],
            )
        else:
            logger.info(
                "retention after %d edits: rel %s gen %s loc %s (fixed-set locality %s)",
                measurement["edits"],
                format_number(measurement.get("reliability")),
                format_number(measurement.get("generalization")),
                format_number(measurement.get("locality")),
                format_number(measurement.get("locality_fixed")),
            )
        with open(self.path, "a") as fh:
            fh.write(json.dumps(measurement) + "\n")


class FanoutSink:
    """Hand each measurement to several sinks (the JSONL file and the Prometheus metrics)."""

    def __init__(self, *sinks: MetricsSink) -> None:
        self.sinks = sinks

    def record(self, measurement: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.record(measurement)


def default_sink(path: str | Path) -> MetricsSink:
    return JsonlSink(path)
