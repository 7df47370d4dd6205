"""The job report: JSON on disk and a retention table on the terminal."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.config import JobConfig
from wise.state import atomic_write


def format_number(value: float | None, digits: int = 3, missing: str = "-") -> str:
    """A measurement for people (logs, terminal and markdown tables): ``digits`` decimals, ``missing`` for None."""
    return missing if value is None else f"{value:.{digits}f}"


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write the report atomically (temporary file, fsync, rename) as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(report, indent=1)))


def build_report(
    cfg: JobConfig,
    *,
    counters: Mapping[str, int],
    applied: Sequence[str],
    accepted: Sequence[str],
    unstored: Sequence[str],
    stopped: bool,
    retractions_pending: Sequence[str] = (),
    resumed_from: dict[str, Any] | None,
    evaluated: int,
    result: dict[str, Any],
    meta: dict[str, Any],
    runtime: dict[str, Any],
    evaluations: list[dict],
    applied_now: int,
    edit_seconds: float,
    wall_seconds: float,
    state_dir: Path,
    dead_letter: str | None,
    serving: dict[str, Any] | None,
    memory: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The job's report: exactly-once accounting, retention, runtime and where the outputs are.

    Args:
        cfg: the job configuration (recorded in the report).
        counters: the job's counters.
        applied: ids of the edits in the final state, in order (an id twice: applied twice).
        accepted: ids of every accepted record.
        unstored: ids of the accepted records of shards not stored yet.
        stopped: the job stopped on SIGTERM: accepted records not in the state are pending (the next run applies
            them), not lost.
        retractions_pending: ids whose retraction waits for the edits before it to be stored (the partial
            last shard: a later run applies it).
        resumed_from: where this run resumed (None: a fresh job).
        evaluated: edits in the final measurement.
        result: the final measurement (``retention_fields``).
        meta: the final state's metadata.
        runtime: ``checkpoints``, ``local_ray``, ``ray_address`` and ``metrics_url``.
        evaluations: the continuous retention measurements.
        applied_now: edits applied by this run.
        edit_seconds: seconds spent editing (up to the last editor call).
        wall_seconds: seconds since the run started.
        state_dir: where the final state is.
        dead_letter: where rejected records went (None: none was rejected).
        serving: the publisher's summary (None: no serving).
        memory: what the edited layer holds to route and answer (:func:`memory_cost`).
    """
    in_state = set(applied)
    # after SIGTERM, accepted records not applied yet are in the checkpoint: the next run applies them
    # (partly applied shards included: only stored shards and the final partial shard are in the state)
    pending = [i for i in unstored if i not in in_state] if stopped else []
    # superseded (a later edit of the same prompt replaced them) and retracted edits left the state on purpose
    superseded, retracted = meta.get("superseded", []), meta.get("retracted", [])
    lost = sorted(set(accepted) - in_state - set(pending) - set(superseded) - set(retracted))
    n = len(applied)
    return {
        "edits_seen": counters["edits_seen"],
        "edits_applied": n,
        "edits_applied_this_run": applied_now,
        "duplicates_applied": n - len(in_state),
        "duplicates_skipped": counters["duplicates_skipped"],
        "edits_lost": len(lost),
        "edits_pending": len(pending),
        "edits_superseded": len(superseded),
        "edits_retracted": len(retracted),
        "retractions_pending": list(retractions_pending),
        "stopped_by_signal": stopped,
        "lost_ids": lost[:20],
        "resumed_from": resumed_from,
        "dead_lettered": counters["dead_lettered"],
        "actor_failures": counters["actor_failures"],
        "evaluated_edits": evaluated,
        **retention_fields(result, meta),
        "runtime": {
            "editors": cfg.runtime.editors,
            "shards_per_editor": cfg.runtime.shards_per_editor,
            "edits_per_second": applied_now / edit_seconds if applied_now else None,
            **runtime,
        },
        "evaluations": evaluations,
        "seconds_per_edit": edit_seconds / applied_now if applied_now else None,
        "wall_seconds": wall_seconds,
        "state_dir": str(state_dir),
        "checkpoint_dir": str(cfg.checkpoint_dir()),
        "dead_letter": dead_letter,
        "serving": serving,
        "memory": memory,
        "per_edit": result["post"]["per_edit"],
        "config": cfg.model_dump(mode="json"),
    }


def memory_cost(tensors: dict[str, Any], meta: dict[str, Any], model_bytes: int) -> dict[str, Any] | None:
    """Bytes the edited layer holds to route and answer for a state (side memories plus routing), as a share of
    the model's parameter bytes and per edit; None for a state without edits."""
    from wise.publish import PublishError, ServingSnapshot

    try:
        snap = ServingSnapshot.from_state(tensors, meta)
    except PublishError:
        return None
    parts = snap.nbytes()
    total = sum(parts.values())
    return {
        "memory_bytes": parts["memories"],
        "routing_bytes": parts["routing"],
        "bytes": total,
        "percent_of_model": 100.0 * total / model_bytes if model_bytes else None,
        "bytes_per_edit": total / snap.n_edits if snap.n_edits else None,
        "memories": len(snap.ids),
        "layout": snap.layout,
    }


def retention_fields(result: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The retention part of the report from the evaluator's final measurement and the final state's metadata.

    Args:
        result: ``EvaluatorActor.evaluate(..., pre=True)`` plus ``mean_steps`` (optimisation steps per edit).
        meta: the final editor state's JSON metadata (memories, thresholds, margins).
    """
    post, pre = result["post"], result["pre"]
    return {
        "retention": post["teacher_forced"],
        "retention_generate": post.get("generate"),
        "pre": pre["teacher_forced"],
        "pre_generate": pre.get("generate"),
        "routed_fraction": post["routed_fraction"],
        "score_over_threshold": post["score_over_threshold"],
        "router": {
            "memories": [
                {"edits": len(m["edit_ids"]), "shards": m["shard_ids"], "threshold": m["threshold"]}
                for m in [*meta["merged"], *meta["pending"], meta["active"]]
                if m["edit_ids"]
            ],
            "margins": meta.get("margins"),
            "mean_steps": result.get("mean_steps"),
        },
    }


def render_summary(report: dict[str, Any], console: Console | None = None) -> None:
    """Print the before/after retention table and the run's counters."""
    console = console or Console()
    table = Table(title=f"Retention after {report['edits_applied']} sequential edits")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    pre, post = report["pre"], report["retention"]
    for key in ("reliability", "generalization", "locality"):
        table.add_row(f"{key} (teacher-forced)", format_number(pre.get(key)), format_number(post.get(key)))
    if report.get("retention_generate"):
        for key in ("reliability", "generalization"):
            table.add_row(
                f"{key} (generation)",
                format_number((report.get("pre_generate") or {}).get(key)),
                format_number(report["retention_generate"].get(key)),
            )
    console.print(table)
    rf = report["routed_fraction"]
    console.print(
        f"edits seen {report['edits_seen']}, applied {report['edits_applied']}, dead-lettered "
        f"{report['dead_lettered']}; {format_number(report['seconds_per_edit'])} s/edit, wall {report['wall_seconds']:.1f} s"
    )
    console.print(
        f"routed to side memory: edits {format_number(rf.get('edit'))}, rephrases {format_number(rf.get('rephrase'))}, "
        f"locality prompts {format_number(rf.get('locality'))}"
    )
    mem = report.get("memory")
    if mem:
        console.print(
            f"side memory: {mem['bytes'] / 2**20:.2f} MiB in {mem['memories']} memories "
            f"({format_number(mem['percent_of_model'], 2)}% of the model), "
            f"{mem['bytes_per_edit'] / 1024:.1f} KiB per edit ({mem['layout']} layout)"
        )
    if "duplicates_applied" in report:
        resumed = report.get("resumed_from")
        rt = report.get("runtime", {})
        console.print(
            f"exactly once: {report['duplicates_applied']} applied twice, {report['edits_lost']} lost, "
            f"{report['duplicates_skipped']} duplicates skipped; "
            + (f"resumed at {resumed['edits_applied']} applied edits; " if resumed else "")
            + f"{rt.get('editors')} editor(s) x {rt.get('shards_per_editor')} shard(s), "
            f"{report.get('actor_failures', 0)} editor failure(s)"
        )
