"""Job configuration: typed, frozen, loaded from YAML with ``key.sub=value`` overrides.

Unknown keys and bad values fail at load time with the key path in the message, e.g.
``wise.merge_freq: merge_freq (1000) must be a multiple of save_freq (300)`` or
``stream.fromat: unknown key``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from orchestrator.model_store import EMBEDDED_MODEL
from wise.config import FrozenConfig, WiseConfig


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key path."""


class ModelConfig(FrozenConfig):
    name: str = Field(EMBEDDED_MODEL, description="local checkpoint dir, hub id, or the embedded model")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")


_KAFKA_KEYS = ("bootstrap", "topic", "group")


class StreamConfig(FrozenConfig):
    """Where the edits come from: a file (``kind: file``) or a Kafka topic (``kind: kafka``)."""

    kind: Literal["file", "kafka"] = Field("file", description="file (or records from Python) | kafka")
    path: str | None = Field(None, description="edit file; None when records come from Python")
    format: str = Field("auto", description="zsre | counterfact | jsonl | parquet | hf | auto")
    dead_letter: str | None = Field(
        None, description="JSONL file for rejected records (default: next to the report); kind=file"
    )
    bootstrap: str | None = Field(None, description="kafka: comma-separated host:port list of brokers")
    topic: str | None = Field(None, description="kafka: topic holding the edit records")
    group: str | None = Field(None, description="kafka: consumer group (committed offsets live there)")
    dead_letter_topic: str | None = Field(
        None, description="kafka: rejected messages (default <topic>.dead-letter)"
    )
    client: dict[str, Any] = Field(
        default_factory=dict,
        description="kafka: librdkafka settings for every client (security.protocol, sasl.*, ssl.*)",
    )
    consumer_client: dict[str, Any] = Field(
        default_factory=dict,
        description="kafka: librdkafka settings for the consumer only (session.timeout.ms, ...)",
    )
    connect_timeout_s: float = Field(30.0, gt=0, description="kafka: how long the broker may be unreachable")
    poll_timeout_s: float = Field(1.0, gt=0, description="kafka: longest wait of an idle job for new edits")

    @model_validator(mode="after")
    def _kind_keys(self) -> StreamConfig:
        if self.kind == "kafka":
            missing = [f"stream.{k}" for k in _KAFKA_KEYS if not getattr(self, k)]
            if missing:
                raise ValueError(f"stream.kind=kafka requires {', '.join(missing)}")
            if self.path is not None:
                raise ValueError("stream.path is for stream.kind=file; a kafka stream reads stream.topic")
            self.kafka_settings()  # reserved client keys, bad topic names
        else:
            used = [f"stream.{k}" for k in (*_KAFKA_KEYS, "dead_letter_topic") if getattr(self, k)]
            used += [f"stream.{k}" for k in ("client", "consumer_client") if getattr(self, k)]
            if used:
                raise ValueError(f"{', '.join(used)} are only used with stream.kind=kafka")
        return self

    def kafka_settings(self) -> Any:
        """The :class:`streams.KafkaSettings` of a ``kind: kafka`` stream.

        Raises:
            ValueError: invalid Kafka settings (reserved client keys, bad topic names), keys prefixed
                ``stream.``.
        """
        from streams import KafkaSettings

        try:
            return KafkaSettings(
                bootstrap=self.bootstrap,
                topic=self.topic,
                group=self.group,
                dead_letter_topic=self.dead_letter_topic,
                client=self.client,
                consumer_client=self.consumer_client,
                connect_timeout_s=self.connect_timeout_s,
                poll_timeout_s=self.poll_timeout_s,
            )
        except ValidationError as err:
            raise ValueError(format_errors(err, prefix="stream.")) from None


class IrrelevantConfig(FrozenConfig):
    """Pool of unrelated ``(prompt, answer)`` pairs for the margin loss: the locality pairs of records that are
    NOT edited (paper: irrelevant inputs come from other records, never from the edited ones)."""

    path: str | None = None
    format: str = "auto"
    limit: int = Field(512, ge=1)


class EvalConfig(FrozenConfig):
    generate: bool = Field(
        True, description="also measure free-generation (greedy) reliability/generalization"
    )
    max_records: int | None = Field(
        None, ge=1, description="final evaluation on at most this many applied edits (evenly spread)"
    )
    every: int | None = Field(
        None, ge=1, description="continuous retention measurement every this many applied edits (None: off)"
    )
    sample: int = Field(32, ge=1, description="past edits sampled per continuous measurement")
    locality_set: int = Field(
        32, ge=0, description="fixed locality set: locality pairs of the stream's first N records"
    )
    recent: int = Field(
        16, ge=0, description="retention of the most recent N edits, next to all past edits (0: off)"
    )


class RuntimeConfig(FrozenConfig):
    """Where and how wide the job runs on Ray."""

    address: str | None = Field(
        None,
        description="Ray cluster to join; None: the cluster of `ray job submit` (RAY_ADDRESS), else a new "
        "local instance",
    )
    editors: int = Field(1, ge=1, description="editor actors, each holding one model replica")
    shards_per_editor: int = Field(
        1, ge=1, description="shards an editor trains at once, as one batched computation"
    )
    editor_cpus: float = Field(1.0, gt=0, description="CPUs reserved per editor (also its torch threads)")
    editor_gpus: float = Field(0.0, ge=0, description="GPUs per editor (fractions share a device)")
    evaluator_cpus: float = Field(0.0, ge=0, description="CPUs reserved for the evaluator actor")
    evaluator_gpus: float = Field(0.0, ge=0)
    local_cpus: int | None = Field(
        None, ge=1, description="CPUs of a local Ray instance (None: all of this machine's)"
    )
    max_actor_failures: int = Field(
        8, ge=0, description="editor deaths tolerated per run before the job gives up"
    )


class CheckpointConfig(FrozenConfig):
    dir: str | None = Field(
        None, description="checkpoint directory (default <output.dir>/checkpoint); same dir = resume"
    )
    every: int | None = Field(
        None,
        ge=1,
        description="also checkpoint every this many edits inside a shard (always at shard ends and merges)",
    )


class MetricsConfig(FrozenConfig):
    """Prometheus metrics of the job (names in ``orchestrator/telemetry/metrics.py``), served while it runs."""

    port: int | None = Field(
        None, ge=0, le=65535, description="serve /metrics on this port; 0: any free port; None: off"
    )
    host: str = Field(
        "127.0.0.1",
        description="address to bind; 0.0.0.0 (all interfaces) in a pod so Prometheus can scrape it",
    )
    linger_s: float = Field(
        0.0, ge=0, description="keep serving this long after the report, for a last scrape of final values"
    )


class PublishConfig(FrozenConfig):
    """A pool of vLLM serving replicas the job publishes its side memories to (``serving/pool.py``)."""

    replicas: int = Field(0, ge=0, description="serving replicas (Ray actors running vLLM); 0: no serving")
    every: int = Field(
        0,
        ge=0,
        description="also publish after this many newly stored edits (0: after merges and at the end)",
    )
    host: str = Field("127.0.0.1", description="address the replicas' OpenAI servers bind")
    port: int = Field(
        0,
        ge=0,
        le=65535,
        description="replicas take the first free port from here on their node (port, port + 1, ...); 0: free ports",
    )
    api_key_env: str | None = Field(
        None, description="environment variable holding the API key (required when host is not loopback)"
    )
    served_name: str = Field("wise", description="model name in /v1/models")
    cpus: float = Field(1.0, gt=0, description="Ray CPUs per replica")
    gpus: float = Field(0.0, ge=0, description="Ray GPUs per replica")
    max_model_len: int = Field(1024, ge=16, description="longest prompt + completion a replica accepts")
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache per replica (GiB)")
    keep_serving_s: float = Field(
        0.0, ge=0, description="after a finite stream ends, keep the pool serving this long before exiting"
    )

    @model_validator(mode="after")
    def _key_off_loopback(self) -> PublishConfig:
        from serving.pool import is_loopback

        if self.replicas and not is_loopback(self.host) and not self.api_key_env:
            raise ValueError(
                f"publish.host ({self.host}) is not loopback: set publish.api_key_env (serve: --api-key-env) to the name of an "
                "environment variable holding the API key the replicas require"
            )
        return self


class OutputConfig(FrozenConfig):
    dir: str = Field("runs/default", description="final WISE state (safetensors + JSON) and the report")
    report: str | None = Field(None, description="report path (default: <dir>/report.json)")


class JobConfig(FrozenConfig):
    """Everything one editing job needs."""

    model: ModelConfig = ModelConfig()
    stream: StreamConfig = StreamConfig()
    irrelevant: IrrelevantConfig = IrrelevantConfig()
    wise: WiseConfig = WiseConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    metrics: MetricsConfig = MetricsConfig()
    publish: PublishConfig = PublishConfig()
    max_edits: int | None = Field(None, ge=1, description="stop after this many applied edits")

    def report_path(self) -> Path:
        return Path(self.output.report) if self.output.report else Path(self.output.dir) / "report.json"

    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.output.dir) / "checkpoint"

    def dead_letter_path(self) -> Path:
        return (
            Path(self.stream.dead_letter)
            if self.stream.dead_letter
            else Path(self.output.dir) / "dead_letter.jsonl"
        )


def format_errors(err: ValidationError, prefix: str = "") -> str:
    """One line per validation error, each naming its key path (``stream.fromat: unknown key``).

    Args:
        err: pydantic's validation error.
        prefix: prepended to every key path (``"stream."`` for a nested model validated on its own).
    """
    lines = []
    for e in err.errors():
        path = prefix + ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        given = e.get("input")
        if e["type"] not in ("extra_forbidden", "missing") and not isinstance(given, Mapping):
            msg += f" (got {given!r})"
        lines.append(f"{path}: {msg}")
    return "; ".join(lines)


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted = "a.b.c"``, creating the mappings on the way.

    Raises:
        ConfigError: a key on the way holds a value, not a mapping.
    """
    keys = dotted.split(".")
    node = tree
    for i, k in enumerate(keys[:-1]):
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys[: i + 1])} is a value, cannot set {dotted}")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are YAML scalars/lists (``wise.layer=20``, ``eval.generate=false``).

    Raises:
        ConfigError: an override without ``=`` or with an empty key.
    """
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return out


def build_config(data: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """Validate a config mapping plus overrides into a :class:`JobConfig`.

    Raises:
        ConfigError: unknown keys or bad values, named by key path.
    """
    tree: dict[str, Any] = copy.deepcopy(dict(data or {}))  # overrides never reach the caller's mapping
    for key, value in parse_overrides(overrides):
        set_path(tree, key, value)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(err)) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
    """Load a YAML job config and apply overrides.

    Raises:
        ConfigError: missing file, invalid YAML, or invalid content (with key paths).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (configs/ holds examples)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    try:
        return build_config(data, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
