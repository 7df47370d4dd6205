"""Retention by the age of an edit: at each milestone of a sequential run, the metrics of the edits made between
consecutive milestones (the first T1 edits, the next T2 - T1, ...), read from each result's ``per_edit`` rows
(in stream order). It tells forgetting of old edits apart from newer edits that never took: at T2 the edits
before T1 are compared with what they scored at T1. Rendering only: every number comes from a results file.
"""

from __future__ import annotations

from typing import Any

from bench.report_cost import MISSING, significant

AGE_METRICS = ("reliability", "generalization", "locality")
MIN_T = 10


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def retention_by_age(per_edit: list[dict], bounds: list[int]) -> list[dict[str, Any]]:
    """Mean of each teacher-forced metric over ``per_edit[lo:hi]`` for consecutive ``bounds`` (``[0, T1, T2,
    ...]``); a range past the end of ``per_edit`` is left out."""
    out = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        rows = per_edit[lo:hi]
        if len(rows) < hi - lo:
            break
        out.append({"edits": (lo, hi), **{k: _mean(rows, k) for k in AGE_METRICS}})
    return out


def age_table(by_method: dict[str, dict[int, dict]]) -> list[str]:
    """Markdown rows: one per (method, milestone T), one column per range of edits between the milestones of any
    method (teacher-forced Rel / Gen / Loc of the edits in that range, measured on the state after T edits);
    empty unless some method has two milestones with ``per_edit`` rows. Milestones under ``MIN_T`` edits are
    left out: a column of one edit says nothing about age."""
    runs = {
        m: {t: r["per_edit"] for t, r in sorted(by_t.items()) if t >= MIN_T and r.get("per_edit")}
        for m, by_t in by_method.items()
        if m != "pre"
    }
    runs = {m: by_t for m, by_t in runs.items() if len(by_t) >= 2}
    if not runs:
        return []
    bounds = [0, *sorted({t for by_t in runs.values() for t in by_t})]
    heads = [
        f"edits {lo}-{hi - 1}" if hi - lo > 1 else f"edit {lo}"
        for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]
    lines = ["| method | T | " + " | ".join(heads) + " |", "|" + " --- |" * (2 + len(heads))]
    for method, by_t in runs.items():
        for t, per_edit in by_t.items():
            ages = retention_by_age(per_edit, [b for b in bounds if b <= t])
            cells = [" / ".join(significant(a[k], 3) for k in AGE_METRICS) for a in ages]
            cells += [MISSING] * (len(heads) - len(cells))
            lines.append(f"| {method} | {t} | " + " | ".join(cells) + " |")
    return lines
