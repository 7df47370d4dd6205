"""Quality benchmark: sequential editing on ZsRE and CounterFact with WISE and the baselines, retention at
milestones T (``wisestream bench quality``; config ``configs/bench/quality.yaml``).

One sequential run per (method, dataset) yields every milestone: after the first T edits of the stream, the
first T edits are evaluated on the editor's state as it is, which is the state an independent T-edit run ends
with (WISE's partial last shard is routable, as in the job's final state; evaluation changes nothing), so the
run goes on from there. A test compares both, tensor by tensor and metric by metric.

Runs are resumable (:mod:`bench.milestones`): the same command again continues from the last checkpoint and never
recomputes a finished milestone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError, model_validator

from bench.carry import pack, unpack
from bench.conflicts import annotate_results, per_edit_conflicts
from bench.milestones import SequentialEditor, evaluate_deferred, sequential_run, write_json
from orchestrator.config import ConfigError, ModelConfig, build_config, format_errors, load_config
from wise.config import FrozenConfig

logger = logging.getLogger(__name__)

# a CI-sized run: T = 1, 2 on the real model, fewer steps and a 32-prompt irrelevant pool (numbers are sanity
# checks only); the baselines keep their settings, they cost about a second per edit
SMOKE_WISE: dict[str, dict[str, Any]] = {
    "keyed": {"keyed": {"n_iter": 10}, "templates": {"count": 1, "length": 4}},
    "shards": {"n_iter": 15, "templates": {"count": 1, "length": 4}},
}


class MixSpec(FrozenConfig):
    """Records of another file spread evenly through a dataset's stream and measured on their own (e.g. the
    near-miss edits, whose locality probes are same-relation prompts about neighbouring subjects)."""

    name: str
    path: str
    format: str = "auto"
    within: int = Field(1000, ge=1, description="spread over the dataset's first `within` records")
    limit: int | None = Field(None, ge=1, description="use only the file's first `limit` records")


class DatasetSpec(FrozenConfig):
    """An edit file and the pool of unrelated records whose locality pairs are the irrelevant inputs."""

    path: str
    format: str = "auto"
    irrelevant: dict[str, Any] = Field(default_factory=dict, description="as the job's irrelevant: block")


class MethodSpec(FrozenConfig):
    """An editor kind and its settings (validated by that kind's config class)."""

    kind: Literal["wise", "ft-l", "grace"]
    from_config: str | None = Field(
        None, description="wise: take the `wise:` block of this job config, then apply `settings`"
    )
    settings: dict[str, Any] = Field(default_factory=dict)
    irrelevant: dict[str, Any] | None = Field(
        None, description="this method's irrelevant pool instead of the dataset's (as the job's irrelevant:)"
    )


class RunSpec(FrozenConfig):
    method: str
    dataset: str
    max_t: int = Field(ge=1)
    milestones: tuple[int, ...] | None = Field(
        None, description="this run's milestones instead of the suite's"
    )
    mix: MixSpec | None = Field(None, description="records of another file mixed into this run's stream")

    @property
    def name(self) -> str:
        return f"{self.method}/{self.dataset}"


class QualityConfig(FrozenConfig):
    """The quality benchmark: datasets, methods, and which (method, dataset) runs go up to which T."""

    model: ModelConfig = ModelConfig()
    milestones: tuple[int, ...] = (1, 10, 100, 1000)
    checkpoint_every: int = Field(10, ge=1, description="edits between state checkpoints inside a run")
    generate: bool = Field(True, description="also measure the free-generation metrics")
    output: str = Field("benchmarks/results", description="results JSON, report and plots (committed)")
    work: str = Field("benchmarks/work", description="resumable editor states (not committed)")
    carry: str | None = Field(
        None,
        description="committed copies of the runs' work directories (bench/carry.py), written by --carry and "
        "restored into an empty work directory before its run resumes",
    )
    datasets: dict[str, DatasetSpec]
    methods: dict[str, MethodSpec]
    runs: tuple[RunSpec, ...]
    smoke: bool = Field(False, description="CI size (set by --smoke)")

    @model_validator(mode="after")
    def _known(self) -> QualityConfig:
        for r in self.runs:
            if r.method not in self.methods:
                raise ValueError(f"runs: unknown method {r.method!r}; choose one of {sorted(self.methods)}")
            if r.dataset not in self.datasets:
                raise ValueError(
                    f"runs: unknown dataset {r.dataset!r}; choose one of {sorted(self.datasets)}"
                )
        if list(self.milestones) != sorted(set(self.milestones)) or self.milestones[0] < 1:
            raise ValueError(f"milestones must be increasing positive integers, got {list(self.milestones)}")
        return self


def load_quality_config(path: str | Path, smoke: bool = False) -> QualityConfig:
    """Load the benchmark config; ``smoke`` shrinks it to T = 1, 2 with few steps, under ``benchmarks/smoke``,
    leaving out the long runs (those with milestones of their own).

    Raises:
        ConfigError: unknown keys or bad values, with the key path.
    """
    try:
        data = yaml_load(path)
        if smoke:
            data = {
                **data,
                "milestones": [1, 2],
                "checkpoint_every": 1,
                "output": "benchmarks/smoke/results",
                "work": "benchmarks/smoke/work",
                "carry": None,
                "datasets": {
                    name: {
                        **d,
                        **({"irrelevant": {**d["irrelevant"], "limit": 32}} if d.get("irrelevant") else {}),
                    }
                    for name, d in data["datasets"].items()
                },
                # a run with milestones of its own is a long run (thousands of edits): not part of the smoke
                "runs": [
                    {
                        **r,
                        "max_t": 2,
                        **({"mix": {**r["mix"], "within": 2, "limit": 1}} if r.get("mix") else {}),
                    }
                    for r in data["runs"]
                    if not r.get("milestones")
                ],
                "smoke": True,
            }
        return QualityConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path}: " + "; ".join(format_errors(err).splitlines())) from None


def yaml_load(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_spec(cls: type[BaseModel], path: str | Path) -> Any:
    """A benchmark config file validated as ``cls``.

    Raises:
        ConfigError: unreadable, not YAML, unknown keys or bad values (with the key path).
    """
    try:
        return cls.model_validate(yaml_load(path))
    except ValidationError as err:
        raise ConfigError(f"{path}: " + "; ".join(format_errors(err).splitlines())) from None


# ---------------------------------------------------------------------------------------------- editors
def method_settings(spec: MethodSpec, smoke: bool = False) -> BaseModel:
    """The validated config object of a method (WiseConfig, FTLConfig or GraceConfig); ``smoke`` applies the
    CI-sized WISE settings of its layout.

    Raises:
        ConfigError: bad settings, with the key path.
    """
    from wise.baselines import FTLConfig, GraceConfig
    from wise.config import WiseConfig

    try:
        if spec.kind == "wise":
            base = load_config(spec.from_config).wise.model_dump() if spec.from_config else {}
            merged = _merge(base, spec.settings)
            if smoke:
                merged = _merge(merged, SMOKE_WISE[merged.get("layout", "keyed")])
            return WiseConfig.model_validate(merged)
        return {"ft-l": FTLConfig, "grace": GraceConfig}[spec.kind].model_validate(spec.settings)
    except ValidationError as err:
        raise ConfigError(f"method settings ({spec.kind}): {err}") from None


def keyed_method(qcfg: QualityConfig, name: str, where: str) -> tuple[Any, list[tuple[str, str]]]:
    """The settings (a keyed-layout WiseConfig) and irrelevant pool of the quality config's method ``name``, for
    the benchmarks that study keyed routing (``where`` names the config key in errors).

    Raises:
        ConfigError: no such method, not a wise method, or not the keyed layout.
    """
    from orchestrator.config import build_config
    from orchestrator.inputs import irrelevant_pool

    method = qcfg.methods.get(name)
    if method is None or method.kind != "wise":
        raise ConfigError(f"{where}: {name!r} is not a wise method of the quality config")
    settings = method_settings(method)
    if settings.layout != "keyed":
        raise ConfigError(f"{where}: {name!r} is not the keyed layout")
    pool = irrelevant_pool(build_config({"irrelevant": method.irrelevant})) if method.irrelevant else []
    return settings, pool


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_editor(
    kind: str, settings: BaseModel, model, tokenizer, irrelevant: Sequence[tuple[str, str]]
) -> SequentialEditor:
    """Build the editor of ``kind`` around ``model`` (its edited layer is wrapped in place)."""
    from wise.baselines import FTLEditor, GraceEditor
    from wise.factory import make_editor as make_wise_editor

    if kind == "wise":
        return make_wise_editor(model, tokenizer, settings, irrelevant=irrelevant)
    if kind == "grace":
        return GraceEditor(model, tokenizer, settings, irrelevant=irrelevant)
    return FTLEditor(model, tokenizer, settings)


# ---------------------------------------------------------------------------------------------- the suite
def machine() -> dict[str, Any]:
    """CPU, cores, torch: what the report prints under every number."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError as err:  # not Linux: the platform's processor name stays
        logger.debug("no /proc/cpuinfo: %s", err)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def invoked_command(argv: Sequence[str] | None = None) -> str:
    """The command line as a user types it (``wisestream ...``), from ``argv`` (default: this process's)."""
    args = sys.argv[1:] if argv is None else argv
    return "wisestream " + " ".join(shlex.quote(a) for a in args)


def dataset_records(spec: DatasetSpec, n: int) -> list:
    """The first ``n`` valid edit records of a dataset (invalid ones are skipped)."""
    from streams import EditStream, open_source

    return [r for _, r in EditStream(open_source(spec.path, spec.format), max_records=n)]


def interleave(main: Sequence[Any], mixed: Sequence[Any], within: int) -> list[Any]:
    """``main`` with ``mixed`` spread evenly over its first ``within`` records (one after every
    ``within / (len(mixed) + 1)``-th main record)."""
    span = min(within, len(main))
    at = [round((j + 1) * span / (len(mixed) + 1)) for j in range(len(mixed))]
    out: list[Any] = []
    k = 0
    for i, rec in enumerate(main):
        out.append(rec)
        while k < len(mixed) and at[k] == i + 1:
            out.append(mixed[k])
            k += 1
    return out + list(mixed[k:])


def stream_positions(
    records: Sequence[Any], mixed_ids: set[str], milestones: Sequence[int]
) -> dict[int, int]:
    """Where each milestone T (T records of the dataset itself) ends in a stream with mixed-in records."""
    out, main = {}, 0
    want = set(milestones)
    for pos, rec in enumerate(records, start=1):
        if rec.id not in mixed_ids:
            main += 1
            if main in want:
                out[main] = pos
    return out


def plan_run(
    qcfg: QualityConfig, run: RunSpec, max_t: int | None = None, read: dict | None = None
) -> tuple[list[int], list]:
    """The milestones one run evaluates and the records it edits, in stream order.

    The milestones are the run's (or the suite's) up to the run's ``max_t`` (capped by ``max_t``), counted in
    records of the dataset itself; a run's ``mix`` records are spread through the stream on top
    (:func:`interleave`). A dataset with fewer valid edits than the largest milestone (records the stream
    rejects, e.g. a blank target, are not edits) ends at its last valid edit instead: that T is every edit the
    dataset has, and is said so. ``read`` caches the records read per (file, count) across calls.

    Raises:
        ConfigError: the dataset has no valid edit at all.
    """
    cap = min(run.max_t, max_t or run.max_t)
    wanted = [t for t in (run.milestones or qcfg.milestones) if t <= cap]
    if not wanted:
        return [], []
    read = {} if read is None else read
    dataset = qcfg.datasets[run.dataset]
    key = (dataset.path, wanted[-1])
    if key not in read:
        read[key] = dataset_records(dataset, wanted[-1])
    records = read[key]
    if not records:
        raise ConfigError(f"run {run.name}: dataset {dataset.path} holds no valid edit")
    milestones = [t for t in wanted if t <= len(records)]
    if len(records) < wanted[-1]:
        logger.warning(
            "run %s: dataset %s has %d valid edits, fewer than T=%d: its last milestone is T=%d, all of them",
            run.name,
            run.dataset,
            len(records),
            wanted[-1],
            len(records),
        )
        if not milestones or milestones[-1] < len(records):
            milestones.append(len(records))
    if run.mix is not None:
        mkey = (run.mix.path, run.mix.limit)
        if mkey not in read:
            read[mkey] = plan_mixed(qcfg, run)
        records = interleave(records, read[mkey], run.mix.within)
    return milestones, records


def plan_mixed(qcfg: QualityConfig, run: RunSpec) -> list:
    """The records mixed into a run's stream (none without ``mix``)."""
    mix = run.mix
    if mix is None:
        return []
    return dataset_records(DatasetSpec(path=mix.path, format=mix.format), mix.limit or 10**9)


def model_bytes(model) -> int:
    """The model's parameter bytes (the unit of a state's memory cost); the edited layer's main weight once."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def pre_probes_dir(work: Path, dataset: str, model: ModelConfig) -> Path:
    """Where the pre-edit model's probes of a dataset's records are kept (one directory per model)."""
    return work / dataset / f"pre-probes-{_digest(model.model_dump())}"


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def serving_cost(editor, records: Sequence[Any], repeats: int = 5) -> dict[str, Any] | None:
    """What this state costs a served forward pass: routed over main-only time, minus one, at prefill and at
    decode (route held), timed as ``bench scale`` times synthetic states, on the run's first 64 edit prompts.
    None for a router without ``hold_route`` or without records."""
    from bench.scale import routing_overhead

    if getattr(editor.routed, "hold_route", None) is None or not records:
        return None
    tokenizer = editor.tokens.tokenizer
    prompts = [list(tokenizer(r.prompt).input_ids) for r in records[:64]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = routing_overhead(editor.model, editor.routed, prompts, pad, repeats)
    return {**out, "repeats": repeats, "threads": torch.get_num_threads()}


def planned_milestones(qcfg: QualityConfig) -> dict[str, list[int]]:
    """Milestones each configured run ``method/dataset`` is to reach (for the report's status table)."""
    read: dict = {}  # each dataset is read once per length, not once per method
    return {run.name: plan_run(qcfg, run, read=read)[0] for run in qcfg.runs}


def quality_benchmark(
    qcfg: QualityConfig,
    only: Sequence[str] = (),
    max_t: int | None = None,
    command: str | None = None,
    pre_only: bool = False,
    defer_eval: bool = False,
    eval_deferred: bool = False,
    carry: bool = False,
) -> dict[str, list[int]]:
    """Run the configured (method, dataset) runs in order, each up to its ``max_t`` (capped by ``max_t``).

    Args:
        qcfg: the benchmark config.
        only: run names ``method/dataset`` to run (all when empty).
        max_t: cap on every run's T (e.g. 100 first, the long runs later).
        command: recorded in each result (default: this process's command line).
        pre_only: only measure the pre-edit model at each run's milestones, applying no edit (a run's own
            evaluation then reads it instead of measuring it; lets it run beside a long editing run).
        defer_eval: keep a copy of each milestone's state and go on editing (:func:`sequential_run`).
        eval_deferred: only measure the milestone states kept by ``defer_eval`` (can run beside the editing).
        carry: only pack each run's work directory into the config's ``carry`` directory (can run beside the
            editing); with ``carry`` configured, every other mode first restores an empty work directory
            from there.

    Returns:
        Milestones evaluated by this call, per run name (with ``carry``: the edits packed).
    """
    from orchestrator.inputs import irrelevant_pool
    from orchestrator.model_store import load_model
    from orchestrator.report import memory_cost
    from wise.evaluate import evaluate_records

    if pre_only + defer_eval + eval_deferred + carry > 1:
        raise ConfigError("choose one of --pre-only, --defer-eval, --eval-deferred and --carry")
    if carry and not qcfg.carry:
        raise ConfigError("--carry needs the config's carry: directory")
    unknown = set(only) - {r.name for r in qcfg.runs}
    if unknown:
        raise ConfigError(f"unknown runs {sorted(unknown)}; choose among {[r.name for r in qcfg.runs]}")
    out, work = Path(qcfg.output), Path(qcfg.work)
    extra = {"command": command or invoked_command(), "machine": machine()}
    job_cfg = build_config({"model": qcfg.model.model_dump()})
    evaluated: dict[str, list[int]] = {}
    for run in qcfg.runs:
        if only and run.name not in only:
            continue
        run_work = work / run.dataset / run.method
        carried = Path(qcfg.carry) / run.dataset / run.method if qcfg.carry else None
        if carry:
            if (run_work / "progress.json").exists():
                evaluated[run.name] = [pack(run_work, carried)]
            continue
        if carried is not None and not pre_only:
            unpack(carried, run_work)
        dataset, spec = qcfg.datasets[run.dataset], qcfg.methods[run.method]
        milestones, records = plan_run(qcfg, run, max_t)
        settings = method_settings(spec, smoke=qcfg.smoke)
        pool_spec = spec.irrelevant if spec.irrelevant is not None else dataset.irrelevant
        if pool_spec and qcfg.smoke:
            pool_spec = {**pool_spec, "limit": 32}
        pool = irrelevant_pool(build_config({"irrelevant": pool_spec})) if pool_spec else []
        fingerprint = {
            "method": spec.kind,
            "settings": settings.model_dump(mode="json"),
            "dataset": dataset.model_dump(exclude_none=True),
            "model": qcfg.model.model_dump(),
        }
        if spec.irrelevant is not None:
            fingerprint["irrelevant"] = spec.irrelevant
        if run.mix is not None:
            fingerprint["mix"] = run.mix.model_dump()
        mixed_ids = {r.id for r in plan_mixed(qcfg, run)}
        results_dir = out / "quality" / run.dataset / run.method

        def make(settings=settings, spec=spec, pool=pool):
            model, tokenizer = load_model(job_cfg)
            return make_editor(spec.kind, settings, model, tokenizer, pool)

        pre_dir = out / "quality" / run.dataset / "pre"

        # the pre-edit model's probes of each slice of records, kept for every later milestone of the dataset
        pre_cache = pre_probes_dir(work, run.dataset, qcfg.model)

        def pre_edit(editor, recs, pre_dir=pre_dir, cache=pre_cache):
            """The pre-edit model's metrics on ``recs`` (the edited layer's main weight alone: the same for every
            method, so computed once per dataset and T and kept in ``quality/<dataset>/pre/``; its probes are
            kept per slice of records, which the next milestone's prefix shares)."""
            pre_path = pre_dir / f"T{len(recs)}.json"
            if pre_path.exists():
                return json.loads(pre_path.read_text())
            pre = evaluate_records(
                editor.model,
                editor.routed,
                editor.tokens,
                recs,
                main_only=True,
                generate=qcfg.generate,
                progress=True,
                cache=cache,
            )
            pre = {k: pre[k] for k in ("teacher_forced", "generate") if k in pre}
            write_json(pre_path, {"T": len(recs), **pre, **extra})
            return pre

        def evaluate(
            editor, recs, cache, pre_edit=pre_edit, mixed_ids=mixed_ids, kind=spec.kind, mix=run.mix
        ):
            """The edited model's metrics on ``recs`` beside the pre-edit model's; probes kept under ``cache``."""
            own = [r for r in recs if r.id not in mixed_ids]
            args = (editor.model, editor.routed, editor.tokens)
            res = evaluate_records(*args, own, generate=qcfg.generate, progress=True, cache=cache / "post")
            out = {"pre": pre_edit(editor, own), **res}
            conflicts = per_edit_conflicts(res.get("per_edit") or [], own)
            if conflicts is not None:
                out["conflicts"] = conflicts
            if mix is not None:
                mixed = [r for r in recs if r.id in mixed_ids]
                post = evaluate_records(
                    *args, mixed, generate=qcfg.generate, progress=True, cache=cache / "mix-post"
                )
                pre = evaluate_records(
                    *args, mixed, main_only=True, generate=qcfg.generate, cache=cache / "mix-pre"
                )
                out["mix"] = {
                    "name": mix.name,
                    "edits": len(mixed),
                    "pre": {k: pre[k] for k in ("teacher_forced", "generate") if k in pre},
                    **{k: post[k] for k in ("teacher_forced", "generate", "routed_fraction") if k in post},
                }
            if kind == "wise":
                out["memory"] = memory_cost(*editor.state_dict(), model_bytes(editor.model))
                out["serving"] = serving_cost(editor, own)
            return out

        if pre_only:
            todo = [t for t in milestones if not (pre_dir / f"T{t}.json").exists()]
            logger.info("run %s: pre-edit model only, milestones left %s", run.name, todo)
            if todo:
                editor = make()
                for t in todo:
                    pre_edit(editor, [r for r in records if r.id not in mixed_ids][:t])
                    logger.info("run %s: pre-edit model measured at T=%d", run.name, t)
            evaluated[run.name] = todo
            continue

        run_extra = {
            **extra,
            "method": run.method,
            "kind": spec.kind,
            "dataset": run.dataset,
            "settings": fingerprint["settings"],
        }
        # results written before the quality benchmark kept the locality conflicts gain them (cheap: text only)
        annotate_results(results_dir, [r for r in records if r.id not in mixed_ids])
        if eval_deferred:
            evaluated[run.name] = evaluate_deferred(
                make,
                records,
                run_work,
                results_dir,
                evaluate=evaluate,
                extra=run_extra,
            )
            continue

        logger.info("run %s: milestones %s", run.name, milestones)
        evaluated[run.name] = sequential_run(
            make,
            records,
            milestones,
            run_work,
            results_dir,
            fingerprint=fingerprint,
            evaluate=evaluate,
            checkpoint_every=qcfg.checkpoint_every,
            extra=run_extra,
            positions=stream_positions(records, mixed_ids, milestones) if mixed_ids else None,
            defer=defer_eval,
        )
    return evaluated
