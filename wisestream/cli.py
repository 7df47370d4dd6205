"""``wisestream`` command line: run a job, retract edits from its checkpoint, push edits into Kafka, run
benchmarks, materialise the embedded model."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from orchestrator.config import ConfigError, load_config

logger = logging.getLogger("wisestream")


def _run(args: argparse.Namespace) -> int:
    from orchestrator.job import run_job
    from orchestrator.report import render_summary

    overrides = list(args.set or [])
    if args.report:
        overrides.append(f"output.report={args.report}")
    cfg = load_config(args.config, overrides)
    report = run_job(cfg)
    render_summary(report)
    sys.stdout.write(f"report: {cfg.report_path()}\n")
    return 0


def _retract(args: argparse.Namespace) -> int:
    from orchestrator.retract import retract_checkpoint

    done = retract_checkpoint(args.checkpoint, args.id)
    sys.stdout.write(
        f"retracted {len(done['retracted'])} edit(s) ({', '.join(done['retracted'])}); {done['edits']} left in "
        f"{done['checkpoint']} ({1e3 * done['seconds']:.1f} ms)\n"
    )
    return 0


def _bench_speed(args: argparse.Namespace) -> int:
    from bench.speed import speed_benchmark

    cfg = load_config(args.config, list(args.set or []))
    result = speed_benchmark(cfg, n_edits=args.edits)
    _save_result(args, result)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def _bench_engines(args: argparse.Namespace) -> int:
    from bench.engines import engine_comparison

    cfg = load_config(args.config, list(args.set or []))
    result = engine_comparison(cfg, load_config(args.compare), n_edits=args.edits)
    _save_result(args, result)
    sides = result["sides"]
    for name, side in sides.items():
        tf = side["metrics"]["teacher_forced"]
        print(
            f"{name:>9}: {side['seconds_per_edit']:.2f} s/edit, {side['steps_per_edit']:.1f} steps/edit, "
            f"rel {tf['reliability']:.3f} gen {tf['generalization']:.3f} loc {tf['locality']:.3f}"
        )
    print(
        f"default is {result['ratio_vs_reference']:.2f}x faster than the reference settings, "
        f"{result['ratio_vs_2edit']:.2f}x faster than the 2-edit editor"
    )
    return 0


def _bench_profile(args: argparse.Namespace) -> int:
    from bench.profile import profile_benchmark

    cfg = load_config(args.config, list(args.set or []))
    result = profile_benchmark(cfg, n_edits=args.edits, job=not args.engine_only, levers=args.levers)
    _save_result(args, result)
    eng = result["engine"]
    print(f"engine: {1 / eng['edits_per_second']:.2f} s/edit, {eng['steps_per_edit']:.1f} steps/edit")
    for stage, sec in eng["stages"].items():
        print(f"  {stage:>16}: {sec:.3f} s/edit")
    for name, lever in result.get("levers", {}).items():
        print(f"{name}: {lever['seconds_per_edit']:.2f} s/edit, the lever gains {lever['gain']:.2f}x")
    for name, job in result.get("jobs", {}).items():
        print(
            f"job ({name}): {1 / job['edits_per_second']:.2f} s/edit, "
            f"{job['ratio_to_engine']:.2f}x the engine's edits/s"
        )
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def _save_result(args: argparse.Namespace, result: dict) -> None:
    """Write a benchmark result with the command and machine, for the report (``--out``)."""
    if args.out:
        from bench.quality import invoked_command, machine

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        record = {"command": invoked_command(args.argv), "machine": machine(), "result": result}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


def _bench_quality(args: argparse.Namespace) -> int:
    from bench.quality import (
        invoked_command,
        load_quality_config,
        planned_milestones,
        quality_benchmark,
    )
    from bench.report import render_report

    qcfg = load_quality_config(args.config, smoke=args.smoke)
    if args.out:
        qcfg = qcfg.model_copy(
            update={"output": args.out, "work": str(Path(args.out) / "work"), "carry": None}
        )
    only = [r for r in (args.runs or "").split(",") if r]
    done = quality_benchmark(
        qcfg,
        only=only,
        max_t=args.max_t,
        command=invoked_command(args.argv),
        pre_only=args.pre_only,
        defer_eval=args.defer_eval,
        eval_deferred=args.eval_deferred,
        carry=args.carry,
    )
    planned = planned_milestones(qcfg)
    report = render_report(qcfg.output, planned)
    sys.stdout.write(json.dumps({"evaluated": done, "report": str(report)}) + "\n")
    return 0


def _bench_values(args: argparse.Namespace) -> int:
    from bench.quality import invoked_command
    from bench.values import load_values_config, values_benchmark

    spec = load_values_config(args.config)
    out = Path(args.out or spec.output)
    result = values_benchmark(spec, out, invoked_command(args.argv))
    summary = {
        "chosen": result["chosen"],
        "rows": [
            {"keyed": r["keyed"], "mean": r["mean"], **r["all"]["teacher_forced"]} for r in result["rows"]
        ],
        "out": str(out),
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def _bench_gate(args: argparse.Namespace) -> int:
    from bench.gate import gate_benchmark, load_gate_config
    from bench.quality import invoked_command, load_quality_config

    spec = load_gate_config(args.config)
    qcfg = load_quality_config(spec.quality)
    out = Path(args.out or spec.output)
    result = gate_benchmark(qcfg, spec, out, invoked_command(args.argv))
    summary = {
        "chosen": result["dev"]["chosen"],
        "test": {k: [r["metrics"]["teacher_forced"] for r in v["rows"]] for k, v in result["test"].items()},
        "out": str(out),
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def _bench_relations(args: argparse.Namespace) -> int:
    from bench.quality import invoked_command, load_quality_config
    from bench.relations import load_relations_config, relations_benchmark

    spec = load_relations_config(args.config)
    qcfg = load_quality_config(spec.quality)
    out = Path(args.out or spec.output)
    result = relations_benchmark(qcfg, spec, out, invoked_command(args.argv))
    summary = {
        "auc": {k: round(v["auc"], 3) for k, v in result["keys"].items()},
        "answer_disjoint": result["answer_disjoint"],
        "out": str(out),
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def _bench_report(args: argparse.Namespace) -> int:
    from bench.quality import load_quality_config, planned_milestones
    from bench.report import render_report

    qcfg = load_quality_config(args.config)
    planned = planned_milestones(qcfg)
    results = Path(args.results or qcfg.output)
    if not results.is_dir():
        sys.stderr.write(f"error: no results directory {results} (`wisestream bench quality` writes it)\n")
        return 1
    report = render_report(results, planned)
    sys.stdout.write(f"{report}\n")
    return 0


def _bench_merges(args: argparse.Namespace) -> int:
    from bench.merges import merge_trace
    from bench.quality import load_quality_config

    qcfg = load_quality_config(args.config, smoke=args.smoke)
    result = merge_trace(qcfg, args.run, args.edits, probes=args.probes, overrides=list(args.set or []))
    _save_result(args, result)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def _bench_layers(args: argparse.Namespace) -> int:
    from bench.speed import layer_scan

    cfg = load_config(args.config, list(args.set or []))
    sys.stdout.write(json.dumps(layer_scan(cfg, n_records=args.records)) + "\n")
    return 0


def _bench_shards(args: argparse.Namespace) -> int:
    from bench.shards import shards_benchmark

    cfg = load_config(args.config, list(args.set or []))
    layouts = tuple(tuple(int(x) for x in item.split("x")) for item in args.layouts.split(","))
    result = shards_benchmark(cfg, args.edits, layouts)
    _save_result(args, result)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def _bench_scale(args: argparse.Namespace) -> int:
    from bench.scale import scale_benchmark

    cfg = load_config(args.config, list(args.set or []))
    compare = load_config(args.compare) if args.compare else None
    ts = tuple(int(x) for x in args.ts.split(","))
    if any(t < 1 for t in ts):
        raise ConfigError(f"--ts must list positive edit counts, got {args.ts}")
    result = scale_benchmark(cfg, ts, repeats=args.repeats, shards_cfg=compare)
    _save_result(args, result)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def _produce(args: argparse.Namespace) -> int:
    from streams import DeadLetterFile, produce_records
    from streams.kafka import check_topic_name

    data = Path(args.data)
    dead_path = Path(args.dead_letter) if args.dead_letter else data.with_name(f"{data.name}.invalid.jsonl")
    if args.partitions < 1:
        raise ConfigError(f"--partitions must be >= 1, got {args.partitions}")
    try:
        check_topic_name(args.topic)
    except ValueError as err:
        raise ConfigError(f"--topic: {err}") from None
    with DeadLetterFile(dead_path) as dead:
        produced, invalid = produce_records(
            data,
            args.format,
            args.topic,
            args.bootstrap,
            partitions=args.partitions,
            dead_letter=dead,
            connect_timeout_s=args.connect_timeout,
            progress=True,
        )
    sys.stdout.write(f"produced {produced}, invalid {invalid}\n")
    if invalid:
        sys.stdout.write(f"invalid rows: {dead_path}\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from orchestrator.config import PublishConfig
    from orchestrator.publish import serve

    try:
        pub = PublishConfig(
            replicas=args.replicas,
            host=args.host,
            port=args.port,
            api_key_env=args.api_key_env,
            served_name=args.served_name,
            max_model_len=args.max_model_len,
        )
    except ValidationError as err:
        raise ConfigError("; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())) from None

    def ready(infos: list[dict]) -> None:
        for info in infos:
            sys.stdout.write(f"{info['name']}: {info['url']}/v1  (version {info['version']})\n")
        sys.stdout.write("serving; Ctrl-C stops\n")
        sys.stdout.flush()

    result = serve(args.checkpoint, pub, model=args.model, watch_s=args.watch, on_ready=ready)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def _bench_serving(args: argparse.Namespace) -> int:
    from bench.serving import serving_benchmark

    result = serving_benchmark(
        args.checkpoint,
        replicas=args.replicas,
        requests=args.requests,
        max_tokens=args.max_tokens,
        prompts=args.prompts,
        model=args.model,
        max_model_len=args.max_model_len,
        rounds=args.rounds,
    )
    _save_result(args, result)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def _model(args: argparse.Namespace) -> int:
    from orchestrator.model_store import materialise_embedded

    sys.stdout.write(f"{materialise_embedded()}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wisestream", description="Lifelong knowledge editing with WISE.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="apply a stream of edits and report retention")
    run.add_argument("config", type=Path, help="YAML job config (see configs/)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set wise.layer=20")
    run.add_argument("--report", help="where to write the JSON report (default: <output.dir>/report.json)")
    run.set_defaults(func=_run)
    retract = sub.add_parser(
        "retract", help="remove applied edits from a stopped job's checkpoint (routing only, no retraining)"
    )
    retract.add_argument("--checkpoint", type=Path, required=True, help="the job's checkpoint.dir")
    retract.add_argument("--id", action="append", required=True, help="an edit id to remove (repeatable)")
    retract.set_defaults(func=_retract)
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    speed = bench_sub.add_parser(
        "speed", help="cached engine vs naive full-forward editing, same edits and settings (shards layout)"
    )
    speed.add_argument("--edits", type=int, default=3, help="edits timed on each side (default 3)")
    speed.add_argument("--config", type=Path, default=Path("configs/wise-2edit.yaml"))
    speed.add_argument("--set", action="append", metavar="KEY=VALUE")
    speed.add_argument("--out", help="also write the result (with command and machine) to this JSON file")
    speed.set_defaults(func=_bench_speed)
    engines = bench_sub.add_parser(
        "engines", help="s/edit of the default editor vs the 2-edit editor and WISE's reference settings"
    )
    engines.add_argument("--edits", type=int, default=20, help="edits applied by each side (default 20)")
    engines.add_argument("--config", type=Path, default=Path("configs/default.yaml"))
    engines.add_argument("--compare", type=Path, default=Path("configs/wise-2edit.yaml"))
    engines.add_argument("--set", action="append", metavar="KEY=VALUE", help="override of --config")
    engines.add_argument("--out", help="also write the result (with command and machine) to this JSON file")
    engines.set_defaults(func=_bench_engines)
    prof = bench_sub.add_parser(
        "profile", help="seconds per edit by stage, and the whole job's edits/s against the engine's"
    )
    prof.add_argument("--edits", type=int, default=40, help="edits applied by each side (default 40)")
    prof.add_argument("--config", type=Path, default=Path("configs/default.yaml"))
    prof.add_argument("--set", action="append", metavar="KEY=VALUE", help="override of --config")
    prof.add_argument("--engine-only", action="store_true", help="the stage profile only, no job")
    prof.add_argument(
        "--levers", action="store_true", help="also time the engine with each speed lever off, one at a time"
    )
    prof.add_argument("--out", help="also write the result (with command and machine) to this JSON file")
    prof.set_defaults(func=_bench_profile)
    quality = bench_sub.add_parser(
        "quality",
        help="retention vs T for WISE and baselines on ZsRE/CounterFact (resumable), then the report",
    )
    quality.add_argument("--config", type=Path, default=Path("configs/bench/quality.yaml"))
    quality.add_argument("--runs", help="only these runs, METHOD/DATASET,... (default: all configured)")
    quality.add_argument("--max-t", type=int, help="cap every run's T (e.g. 100 before the long runs)")
    quality.add_argument("--smoke", action="store_true", help="CI size: T=1,2, few steps, benchmarks/smoke/")
    quality.add_argument("--out", help="results directory (default: the config's output)")
    quality.add_argument(
        "--pre-only",
        action="store_true",
        help="only measure the pre-edit model at the runs' milestones (no edits; can run beside a long run)",
    )
    quality.add_argument(
        "--defer-eval",
        action="store_true",
        help="at each milestone keep a copy of the state and go on editing (--eval-deferred measures it)",
    )
    quality.add_argument(
        "--eval-deferred",
        action="store_true",
        help="only measure the milestone states kept by --defer-eval (can run beside the editing, e.g. on "
        "another core)",
    )
    quality.add_argument(
        "--carry",
        action="store_true",
        help="only pack the runs' work directories into the config's carry: directory, to commit them (can run "
        "beside the editing; a later command on an empty work directory restores them)",
    )
    quality.set_defaults(func=_bench_quality)
    gate = bench_sub.add_parser(
        "gate", help="the keyed relation gate: chosen on the development split, measured on a finished run"
    )
    gate.add_argument("--config", type=Path, default=Path("configs/bench/gate.yaml"))
    gate.add_argument("--out", help="result JSON (default: the config's output)")
    gate.set_defaults(func=_bench_gate)
    values = bench_sub.add_parser(
        "values",
        help="the keyed layout's output vectors (keyed.values, value_lr): chosen on the development split",
    )
    values.add_argument("--config", type=Path, default=Path("configs/bench/values.yaml"))
    values.add_argument("--out", help="result JSON (default: the config's output)")
    values.set_defaults(func=_bench_values)
    relations = bench_sub.add_parser(
        "relations",
        help="how well relation keys separate rephrases from other relations of a subject (development split)",
    )
    relations.add_argument("--config", type=Path, default=Path("configs/bench/relations.yaml"))
    relations.add_argument("--out", help="result JSON (default: the config's output)")
    relations.set_defaults(func=_bench_relations)
    report = bench_sub.add_parser("report", help="render REPORT.md and plots from the results files")
    report.add_argument("--config", type=Path, default=Path("configs/bench/quality.yaml"))
    report.add_argument("--results", help="results directory (default: the config's output)")
    report.set_defaults(func=_bench_report)
    merges = bench_sub.add_parser(
        "merges",
        help="trace a WISE-Merge run: routing activation of shards and merged memory at every merge",
    )
    merges.add_argument("--run", default="wise-merge/zsre", help="METHOD/DATASET of the quality config")
    merges.add_argument("--edits", type=int, default=30, help="edits to apply (default 30)")
    merges.add_argument("--probes", type=int, default=60, help="unrelated (locality) prompts measured")
    merges.add_argument("--config", type=Path, default=Path("configs/bench/quality.yaml"))
    merges.add_argument("--smoke", action="store_true", help="the quality config's CI size (few steps)")
    merges.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="WISE setting, e.g. merge_freq=20"
    )
    merges.add_argument("--out", help="also write the result (with command and machine) to this JSON file")
    merges.set_defaults(func=_bench_merges)
    layers = bench_sub.add_parser(
        "layers", help="which layer's activations separate edits from unrelated prompts"
    )
    layers.add_argument("--records", type=int, default=60)
    layers.add_argument("--config", type=Path, default=Path("configs/default.yaml"))
    layers.add_argument("--set", action="append", metavar="KEY=VALUE")
    layers.set_defaults(func=_bench_layers)
    shards = bench_sub.add_parser(
        "shards", help="edits/s for (editors x shards per editor) layouts on Ray, same edits, states compared"
    )
    shards.add_argument("--edits", type=int, default=8, help="edits per layout (default 8)")
    shards.add_argument("--layouts", default="1x1,1x4,2x1", help="EDITORSxSHARDS,... (first is the baseline)")
    shards.add_argument("--config", type=Path, default=Path("configs/default.yaml"))
    shards.add_argument("--set", action="append", metavar="KEY=VALUE")
    shards.add_argument("--out", help="also write the result (with command and machine) to this JSON file")
    shards.set_defaults(func=_bench_shards)
    scale = bench_sub.add_parser(
        "scale", help="bytes and routing overhead of the edited layer per T, with retention where measured"
    )
    scale.add_argument("--ts", default="100,1000,10000,100000", help="edit counts (default 100,...,100000)")
    scale.add_argument("--repeats", type=int, default=5, help="timed forwards per measurement (median)")
    scale.add_argument("--config", type=Path, default=Path("configs/default.yaml"))
    scale.add_argument(
        "--compare", type=Path, help="a shards-layout config to measure beside it (configs/wise-2edit.yaml)"
    )
    scale.add_argument("--set", action="append", metavar="KEY=VALUE")
    scale.add_argument("--out", help="also write the result (with command and machine) to this JSON file")
    scale.set_defaults(func=_bench_scale)
    produce = sub.add_parser(
        "produce", help="push an edit file into a Kafka topic (canonical JSON, keyed by id)"
    )
    produce.add_argument(
        "--data", required=True, help="edit file (JSON, JSON Lines, Parquet, HF dataset dir)"
    )
    produce.add_argument("--format", default="auto", help="zsre | counterfact | jsonl | parquet | hf | auto")
    produce.add_argument("--topic", required=True)
    produce.add_argument("--bootstrap", required=True, help="host:port[,host:port...] of the brokers")
    produce.add_argument(
        "--partitions", type=int, default=1, help="partitions if the topic is created (1 keeps a total order)"
    )
    produce.add_argument(
        "--dead-letter", help="JSONL file for invalid rows (default: <data>.invalid.jsonl next to the data)"
    )
    produce.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to reach the broker")
    produce.set_defaults(func=_produce)
    srv = sub.add_parser(
        "serve", help="serve a checkpointed WISE state through vLLM's OpenAI API (Ray actors)"
    )
    srv.add_argument("--checkpoint", required=True, help="a job's checkpoint dir, output dir or state dir")
    srv.add_argument(
        "--port",
        type=int,
        default=8000,
        help="first port; replicas on one machine take port, port + 1, ... (default 8000)",
    )
    srv.add_argument("--replicas", type=int, default=1)
    srv.add_argument("--host", default="127.0.0.1", help="bind address; not loopback requires --api-key-env")
    srv.add_argument("--api-key-env", help="environment variable holding the API key clients must send")
    srv.add_argument("--model", help="the unedited model (default: the one the job recorded)")
    srv.add_argument("--served-name", default="wise", help="model name in /v1/models (default wise)")
    srv.add_argument("--max-model-len", type=int, default=1024)
    srv.add_argument(
        "--watch", type=float, default=0.0, help="re-read the checkpoint every S seconds, publish changes"
    )
    srv.set_defaults(func=_serve)
    bserve = bench_sub.add_parser(
        "serving", help="publish latency and served tokens/s with and without routing"
    )
    bserve.add_argument("--checkpoint", required=True, help="a job's checkpoint, output or state dir")
    bserve.add_argument("--replicas", type=int, default=2)
    bserve.add_argument("--requests", type=int, default=32, help="completions per measurement")
    bserve.add_argument("--max-tokens", type=int, default=32)
    bserve.add_argument(
        "--prompts",
        help="edit file (JSON/JSONL, any stream layout) for request prompts: its prompts and locality prompts "
        "(default: the job's journal, else the state's edit prompts)",
    )
    bserve.add_argument(
        "--model",
        help="the unedited model (default: the one the job recorded, else embedded:smollm2-135m-instruct)",
    )
    bserve.add_argument("--max-model-len", type=int, default=1024, help="longest prompt + completion served")
    bserve.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="throughput measurements per side, routing on and off alternating",
    )
    bserve.add_argument("--out", help="also write the result (with command and machine) to this JSON file")
    bserve.set_defaults(func=_bench_serving)
    model = sub.add_parser("model", help="materialise the embedded model checkpoint and print its path")
    model.set_defaults(func=_model)
    return parser


# The errors a user can fix (a missing or malformed file, a bad setting, a service that is down): printed as one
# line, exit 1. Looked up in the modules already imported (an error's module always is): a failed `produce` does
# not import torch just to print its line.
USER_ERRORS = (
    ("orchestrator.checkpoint", "CheckpointError"),
    ("orchestrator.cluster", "ClusterError"),
    ("orchestrator.errors", "JobError"),
    ("orchestrator.model_store", "ModelUnavailableError"),
    ("orchestrator.publish", "ServeError"),
    ("orchestrator.retract", "RetractError"),
    ("serving.pool", "ServingError"),
    ("streams.errors", "StreamError"),
    ("wise.layout", "LayoutError"),
    ("wise.publish", "PublishError"),
    ("wise.state", "StateError"),
)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is one of :data:`USER_ERRORS` (a subclass included)."""
    for module, name in USER_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(err, getattr(loaded, name)):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error ends in one ``error: ...`` line on stderr (its traceback with
    ``--verbose``), anything else in a traceback.

    Returns:
        The exit status: 0, 1 for a user error, 2 for a configuration error.
    """
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by benchmarks with their results
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # librdkafka logs every failed connection attempt as an error, dozens a second while a broker is down; the
    # Kafka clients' error callbacks report that once (a warning, then an error when it lasts)
    logging.getLogger("streams.kafka.rdkafka").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    try:
        return args.func(args)
    except Exception as err:  # the user-facing boundary: a bug still ends in its traceback
        if isinstance(err, ConfigError):
            prefix, status = "config error", 2
        elif is_user_error(err):
            prefix, status = "error", 1
        else:
            raise
        if args.verbose:
            traceback.print_exc()
        sys.stderr.write(f"{prefix}: {err}\n")
        return status


if __name__ == "__main__":
    raise SystemExit(main())
