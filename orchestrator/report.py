"""The job report: JSON on disk and a retention table on the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from wise.state import atomic_write


def format_number(value: float | None, digits: int = 3, missing: str = "-") -> str:
    """A measurement for people (logs, terminal and markdown tables): ``digits`` decimals, ``missing`` for None."""
    return missing if value is None else f"{value:.{digits}f}"


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write the report atomically (temporary file, fsync, rename) as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(report, indent=1)))


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
            "margins": meta["margins"],
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
