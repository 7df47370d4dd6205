"""The cost half of the benchmark report: what the edited layer holds beside each retention number (bytes per
edit, share of the model) and the "Cost at scale" section rendered from ``scale.json`` (``wisestream bench
scale --out ...``). Rendering only: every number is read from a results file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.conflicts import locality_ceiling

MISSING = "–"
LAYOUT_ORDER = ("keyed", "shards")
COST_HEADERS = ("B/edit", "% of model")


def significant(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits and no exponent (``0.00412``, ``3.54``, ``331``)."""
    if value is None:
        return MISSING
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def human_bytes(n: float | None) -> str:
    """Bytes in binary units with three significant digits (``35.4 KiB``, ``3.38 MiB``)."""
    if n is None:
        return MISSING
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    k = 0
    while abs(n) >= 1024 and k < len(units) - 1:
        n, k = n / 1024, k + 1
    return f"{significant(n)} {units[k]}"


def memory_cells(result: dict[str, Any]) -> list[str]:
    """The cost cells beside a quality result: bytes per edit and the edited layer's memory as a percentage of
    the model, from the result's ``memory`` block (en dashes for a result without one: nothing is inferred)."""
    memory = result.get("memory") or {}
    return [human_bytes(memory.get("bytes_per_edit")), significant(memory.get("percent_of_model"))]


def _ratio(overhead: dict | None, phase: str) -> str:
    """Routed over main-only forward time (the record keeps the overhead, ratio minus one) and the two median
    times in milliseconds."""
    if not overhead or overhead.get(phase) is None:
        return "not timed"
    routed, main = overhead.get(f"{phase}_seconds"), overhead.get(f"{phase}_main_seconds")
    times = f" ({routed * 1e3:.1f} / {main * 1e3:.1f} ms)" if routed is not None and main is not None else ""
    return f"{1.0 + overhead[phase]:.2f}x{times}"


def milestone_cost_table(by_method: dict[str, dict[int, dict]]) -> list[str]:
    """Markdown rows for the results that carry a ``serving`` block (the quality benchmark times a served
    forward pass on each milestone's state): retention, memory, serving overhead, editing and evaluation time per
    milestone. Empty when no result has one."""
    rows = [
        (m, t, r)
        for m, by_t in sorted(by_method.items())
        if m != "pre"
        for t, r in sorted(by_t.items())
        if r.get("serving")
    ]
    if not rows:
        return []
    lines = [
        "| method | T | mean(Rel, Gen, Loc) | Loc | Loc, facts not edited | Loc ceiling | "
        + " | ".join(COST_HEADERS)
        + " | prefill routed/main | decode routed/main | s/edit | evaluation s |",
        "|" + " --- |" * (10 + len(COST_HEADERS)),
    ]
    for method, t, r in rows:
        tf = r.get("teacher_forced") or {}
        three = [tf.get(k) for k in ("reliability", "generalization", "locality")]
        avg = sum(three) / 3 if all(v is not None for v in three) else None
        split = r.get("conflicts") or {}
        ceiling = locality_ceiling(split, tf.get("locality"), t) if split else None
        lines.append(
            f"| {method} | {t} | {significant(avg)} | {significant(tf.get('locality'))} | "
            + f"{significant(split.get('locality_unedited_facts'))} | {significant(ceiling)} | "
            + " | ".join(memory_cells(r))
            + f" | {_ratio(r['serving'], 'prefill')} | {_ratio(r['serving'], 'decode')} | "
            + f"{significant(r.get('seconds_per_edit'))} | {significant(r.get('eval_seconds'))} |"
        )
    return lines


def _retention_cell(retention: dict | None) -> str:
    if not retention:
        return MISSING
    parts = []
    for dataset, r in sorted(retention.items()):
        vals = " / ".join(significant(r.get(k), 2) for k in ("reliability", "generalization", "locality"))
        parts.append(f"{dataset} T{r.get('T')}: {vals}")
    return "; ".join(parts)


def _rows(result: dict[str, Any]) -> list[dict]:
    def key(row: dict) -> tuple:
        layout = row["layout"]
        return (LAYOUT_ORDER.index(layout) if layout in LAYOUT_ORDER else len(LAYOUT_ORDER), layout, row["T"])

    return sorted(result["rows"], key=key)


def scale_table(result: dict[str, Any]) -> list[str]:
    """Markdown rows: one per (layout, T), keyed layout first."""
    lines = [
        "| layout | T | bytes | % of model | bytes/edit | prefill routed/main | decode routed/main | "
        "retention Rel / Gen / Loc |",
        "|" + " --- |" * 8,
    ]
    for row in _rows(result):
        overhead = row.get("overhead")
        lines.append(
            f"| {row['layout']} | {row['T']} | {human_bytes(row['bytes'])} | {significant(row['percent_of_model'])} "
            f"| {human_bytes(row['bytes_per_edit'])} | {_ratio(overhead, 'prefill')} | "
            f"{_ratio(overhead, 'decode')} | {_retention_cell(row.get('retention'))} |"
        )
    return lines


def plot_cost(result: dict[str, Any], path: Path) -> Path:
    """Memory as a percentage of the model against T, log-log, one line per layout; the model's own size
    dotted at 100%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    by_layout: dict[str, list[tuple[int, float]]] = {}
    for row in _rows(result):
        by_layout.setdefault(row["layout"], []).append((row["T"], row["percent_of_model"]))
    for layout, pts in by_layout.items():
        ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=layout)
    ax.axhline(100.0, linestyle=":", color="grey", label="the model itself")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("T (edits held)")
    ax.set_ylabel("edited layer's memory, % of the model's bytes")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scale_section(record: dict[str, Any] | None, results: Path, machine: str) -> list[str]:
    """The "Cost at scale" section from the ``scale.json`` record (``{"command", "machine", "result"}``), and
    its plot ``cost_vs_edits.png`` under ``results``; says plainly when there is no record."""
    lines = ["## Cost at scale", ""]
    if not record:
        return [
            *lines,
            "**Not measured yet.** Memory and routing overhead against the number of edits come from "
            "`wisestream bench scale --compare configs/wise-2edit.yaml --out benchmarks/results/scale.json`, "
            "which writes `scale.json` here; no number is given until it exists.",
            "",
        ]
    r = record["result"]
    png = plot_cost(r, results / "cost_vs_edits.png")
    pre, dec = r.get("prefill") or {}, r.get("decode") or {}
    lines += [
        "What the edited layer holds to route and answer after T edits (side memories and routing table), "
        f"against the model's {human_bytes(r['model_bytes'])} of parameters, and the routed forward's time over "
        "the same forward with routing off: prefill of "
        f"{pre.get('sequences')} prompts x {pre.get('tokens')} tokens, decode of {dec.get('sequences')} "
        f"sequences one token each with their prefill route held; median of {r.get('repeats')} routed/main "
        "pairs timed alternately, so the ratio holds on a busy machine (the times beside it do not). The "
        "states are synthetic (random values) of the real shapes: the real model, the layout's real number of "
        "memories, columns, keys and subjects. A shards row marked not timed had more memories than the "
        "benchmark builds; its bytes are computed. Retention is read from the quality results at the closest "
        "T at or below (within 10%), where they exist.",
        "",
        f"Command: `{record.get('command', '')}`.",
        "",
        *scale_table(r),
        "",
        f"![cost vs edits]({png.name})",
        "",
        f"Machine: {machine}.",
        "",
    ]
    return lines
