"""The benchmark report: ``benchmarks/results/REPORT.md`` and its retention-vs-T plots, rendered only from the
results files that the benchmark commands wrote (``wisestream bench report``). Nothing here measures anything:
every number in the report is read from a file that records the command that produced it.

Inputs under the results directory:
- ``quality/<dataset>/<method>/T<t>.json`` and ``quality/<dataset>/pre/T<t>.json``: ``wisestream bench quality``;
- ``speed.json``: ``wisestream bench speed --out ...``; ``shards.json``: ``wisestream bench shards --out ...``;
- ``serving.json``: ``wisestream bench serving --out ...`` (tokens/s with routing on and off, publish latency); without
  it the section says it has not been measured.
- ``merges_*.json``: ``wisestream bench merges --out ...`` (routing activations at every merge of a WISE-Merge
  run); the section is left out when there is none.
- ``scale.json``: ``wisestream bench scale --out ...`` (memory and routing overhead against T per layout; see
  :mod:`bench.report_cost`); without it the section says it has not been measured.
- ``engines.json`` and ``profile.json``: ``wisestream bench engines --out ...`` and ``wisestream bench profile
  --out ...`` (seconds per edit by editor and by stage, the job against its engine; :mod:`bench.report_speed`).
- ``gate.json``: ``wisestream bench gate`` (the keyed relation gate's development sweep and test runs;
  :mod:`bench.report_gate`); ``gate_values.json``: the same choice for the output-vector layout
  (``--config configs/bench/gate_values.yaml``), ``gate_residual.json`` with the residual relation key
  (``--config configs/bench/gate_residual.yaml``); each section is left out when its file is absent.
- ``values.json``: ``wisestream bench values`` (the output vectors' development choice; same module).
- ``relations.json``: ``wisestream bench relations`` (how well relation keys separate rephrases from other
  relations of a subject, development split; same module).

Every retention number stands beside its cost: the quality tables carry bytes per edit and memory as a share of
the model from each result's ``memory`` block (an en dash where a result has none).
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

from bench.report_age import age_table
from bench.report_cost import (
    COST_HEADERS,
    memory_cells,
    milestone_cost_table,
    scale_section,
    scale_table,
)
from bench.report_gate import gate_section, relations_section, values_section
from bench.report_speed import edit_speed_section
from orchestrator.report import format_number

logger = logging.getLogger(__name__)

METRICS = (
    ("teacher_forced", "reliability", "Rel"),
    ("teacher_forced", "generalization", "Gen"),
    ("teacher_forced", "locality", "Loc"),
    ("generate", "reliability", "Rel (gen.)"),
    ("generate", "generalization", "Gen (gen.)"),
)
METHOD_ORDER = ("keyed-values", "keyed", "wise-retrieve", "wise-merge", "ft-l", "grace")


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _t_of(path: Path) -> int:
    return int(path.stem[1:])


def collect_quality(results: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """``{dataset: {method or "pre": {T: result}}}`` from the quality results files."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for f in sorted((results / "quality").glob("*/*/T*.json")):
        dataset, method = f.parent.parent.name, f.parent.name
        out.setdefault(dataset, {}).setdefault(method, {})[_t_of(f)] = json.loads(f.read_text())
    return out


def _value(result: dict, group: str, key: str) -> float | None:
    return (result.get(group) or {}).get(key)


# a missing value in the report's markdown tables is an en dash
_cell = partial(format_number, missing="–")


def _methods(by_method: dict[str, dict]) -> list[str]:
    known = [m for m in METHOD_ORDER if m in by_method]
    return known + sorted(m for m in by_method if m not in known and m != "pre")


def quality_table(by_method: dict[str, dict[int, dict]]) -> list[str]:
    """Markdown rows: one per (method, T), pre-edit rows first."""
    head = (
        "| method | T | "
        + " | ".join(h for _, _, h in METRICS)
        + " | min(Rel, Gen, Loc) | "
        + " | ".join(COST_HEADERS)
        + " | s/edit | command |"
    )
    lines = [head, "|" + " --- |" * (len(METRICS) + 5 + len(COST_HEADERS))]
    for t, r in sorted(by_method.get("pre", {}).items()):
        vals = " | ".join(_cell(_value(r, g, k)) for g, k, _ in METRICS)
        lines.append(f"| pre-edit model | {t} | {vals} | | | | | `{r.get('command', '')}` |")
    for method in _methods(by_method):
        for t, r in sorted(by_method[method].items()):
            vals = [_value(r, g, k) for g, k, _ in METRICS]
            three = [v for v in vals[:3] if v is not None]
            low = min(three) if len(three) == 3 else None
            lines.append(
                f"| {method} | {t} | "
                + " | ".join(_cell(v) for v in vals)
                + f" | {_cell(low)} | "
                + " | ".join(memory_cells(r))
                + f" | {_cell(r.get('seconds_per_edit'), 2)} | `{r.get('command', '')}` |"
            )
    return lines


def near_miss_table(by_method: dict[str, dict[int, dict]]) -> list[str]:
    """Markdown rows for the results that carry a ``mix`` block: the near-miss edits mixed into the stream,
    measured on their own after the run's T edits (post-edit, routed fractions, pre-edit). Empty without any
    (a milestone reached before the first mixed edit has none to show)."""
    rows = [
        (m, t, r["mix"])
        for m in _methods(by_method)
        for t, r in sorted(by_method[m].items())
        if (r.get("mix") or {}).get("edits")
    ]
    if not rows:
        return []
    lines = [
        "| method | T | mix | edits | "
        + " | ".join(h for _, _, h in METRICS)
        + " | routed: edit / rephrase / locality | pre-edit Rel / Gen / Loc |",
        "|" + " --- |" * (len(METRICS) + 6),
    ]
    for method, t, mix in rows:
        routed = mix.get("routed_fraction") or {}
        pre = mix.get("pre") or {}
        lines.append(
            f"| {method} | {t} | {mix.get('name', '')} | {mix.get('edits', '')} | "
            + " | ".join(_cell(_value(mix, g, k)) for g, k, _ in METRICS)
            + " | "
            + " / ".join(_cell(routed.get(k), 2) for k in ("edit", "rephrase", "locality"))
            + " | "
            + " / ".join(
                _cell(_value(pre, "teacher_forced", k)) for k in ("reliability", "generalization", "locality")
            )
            + " |"
        )
    return lines


def headline_table(quality: dict[str, dict[str, dict[int, dict]]]) -> list[str]:
    """Per dataset, every method at the largest T that all methods have reached, and at the largest T each has
    reached."""
    lines = [
        "| dataset | T | method | "
        + " | ".join(h for _, _, h in METRICS)
        + " | "
        + " | ".join(COST_HEADERS)
        + " | s/edit |",
        "|" + " --- |" * (len(METRICS) + 4 + len(COST_HEADERS)),
    ]
    for dataset in sorted(quality):
        by_method = quality[dataset]
        methods = _methods(by_method)
        if not methods:
            continue
        common = set.intersection(*(set(by_method[m]) for m in methods))
        ts = sorted({*([max(common)] if common else []), *(max(by_method[m]) for m in methods)})
        for t in ts:
            pre = by_method.get("pre", {}).get(t)
            rows = [("pre-edit", pre)] if pre else []
            rows += [(m, by_method[m][t]) for m in methods if t in by_method[m]]
            for method, r in rows:
                vals = " | ".join(_cell(_value(r, g, k)) for g, k, _ in METRICS)
                cost = " | ".join(memory_cells(r)) if method != "pre-edit" else " | "
                lines.append(
                    f"| {dataset} | {t} | {method} | {vals} | {cost} | {_cell(r.get('seconds_per_edit'), 2)} |"
                )
    return lines


def plot_retention(dataset: str, by_method: dict[str, dict[int, dict]], path: Path) -> Path:
    """Retention-vs-T curves, one panel per metric, one line per method (pre-edit dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(12, 6.8), sharey=True)
    axes = list(grid.flat)
    for ax, (group, key, title) in zip(axes, METRICS, strict=False):
        for method in [*_methods(by_method), "pre"]:
            pts = sorted((t, _value(r, group, key)) for t, r in by_method.get(method, {}).items())
            pts = [(t, v) for t, v in pts if v is not None]
            if not pts:
                continue
            style = {"linestyle": "--", "color": "grey"} if method == "pre" else {"marker": "o"}
            ax.plot(
                [t for t, _ in pts],
                [v for _, v in pts],
                label="pre-edit" if method == "pre" else method,
                **style,
            )
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel("T (sequential edits)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    grid[0, 0].set_ylabel(f"{dataset}: retention over all T edits")
    grid[1, 0].set_ylabel("free generation")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].axis("off")  # the sixth panel holds the legend
    axes[-1].legend(handles, labels, loc="center", title=dataset)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _machine_line(m: dict | None) -> str:
    if not m:
        return "machine not recorded"
    if "cores" not in m:  # recorded by another benchmark in its own shape
        return ", ".join(f"{k} {v}" for k, v in m.items())
    gpu = f", GPU {m['cuda']}" if m.get("cuda") else ", no GPU"
    return (
        f"{m.get('cpu') or 'CPU'}, {m.get('cores')} cores ({m.get('torch_threads')} torch threads){gpu}, "
        f"torch {m.get('torch')}, {m.get('platform')}"
    )


def _status(quality: dict, planned: dict[str, list[int]] | None) -> list[str]:
    lines = ["| run | milestones done | milestones still to run |", "| --- | --- | --- |"]
    names = list(planned) if planned else [f"{m}/{d}" for d in quality for m in _methods(quality[d])]
    for name in names:
        method, dataset = name.split("/")
        done = sorted(quality.get(dataset, {}).get(method, {}))
        left = [t for t in (planned or {}).get(name, []) if t not in done]
        lines.append(f"| {name} | {', '.join(map(str, done)) or '–'} | {', '.join(map(str, left)) or '–'} |")
    return lines


def _diff(x: float | None) -> str:
    return "–" if x is None else f"{x:.1e}"


def _speed_metrics(r: dict) -> str:
    """Rel / gen / loc of the engine's state, and whether they are all 0 or 1 (then equality says little)."""
    tf = (r.get("metrics_engine") or {}).get("teacher_forced")
    if not tf:
        return "–"
    text = " / ".join(_cell(tf.get(k)) for k in ("reliability", "generalization", "locality"))
    saturated = r.get("metrics_saturated")
    if saturated is None:
        saturated = all(v in (0.0, 1.0) for v in tf.values() if v is not None)
    return text + (" (all 0 or 1)" if saturated else "")


def _speed_section(results: Path) -> list[str]:
    lines = ["### The cached engine at equal settings, and parallel shards", ""]
    speed = _load(results / "speed.json")
    if speed:
        r = speed["result"]
        lines += [
            "Seconds per edit of the editing engine against the naive reference that recomputes the full forward "
            f"pass at each of the {r.get('n_iter')} iterations (same model, {r.get('edits')} edits, same "
            "hyper-parameters; one run):",
            "",
            "| engine s/edit | naive s/edit | ratio | retention metrics equal | metrics (engine) | largest "
            "state difference | command |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {_cell(r['seconds_per_edit_engine'], 2)} | {_cell(r['seconds_per_edit_naive'], 2)} | "
            f"**{_cell(r['ratio'], 2)}** | {r['metrics_equal']} | {_speed_metrics(r)} | "
            f"{_diff(r.get('max_abs_delta_diff'))} | `{speed['command']}` |",
            "",
            f"Machine: {_machine_line(speed.get('machine'))}.",
            "",
        ]
    else:
        lines += [
            "Not measured yet: run `wisestream bench speed --edits 3 --set stream.path=data/zsre_train_1k.json "
            "--set stream.format=zsre --out benchmarks/results/speed.json`.",
            "",
        ]
    shards = _load(results / "shards.json")
    if shards:
        r = shards["result"]
        lines += [
            f"Edits per second for editor actors x shards per actor on Ray ({r['edits']} edits per layout, "
            "final states compared with the first layout's):",
            "",
            "| layout | edits/s | s/edit | speedup | max state difference | command |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, v in r["layouts"].items():
            diff = r["max_state_diff"].get(name)
            lines.append(
                f"| {v['editors']} x {v['shards_per_editor']} | {_cell(v['edits_per_second'])} | "
                f"{_cell(v['seconds_per_edit'], 1)} | {_cell(r.get(f'speedup_{name}', 1.0), 2)} | "
                f"{'' if diff is None else _diff(diff)} | `{shards['command']}` |"
            )
        lines += ["", f"Machine: {_machine_line(shards.get('machine'))}.", ""]
    else:
        lines += [
            "Edits/s per layout not measured yet: run `wisestream bench shards --out "
            "benchmarks/results/shards.json`.",
            "",
        ]
    lines += ["## Serving", ""]
    # serving.json, then the other serving_*.json results (e.g. a keyed state at T = 1,000), one block each
    records = [
        (f.stem, _load(f)) for f in sorted(results.glob("serving*.json"), key=lambda f: f.stem != "serving")
    ]
    for stem, record in records:
        serving = record["result"]
        lines += [
            f"### {stem}",
            "",
            f"vLLM serving pool ({serving.get('layout', 'shards')} layout): {serving.get('replicas')} replicas of {serving.get('model')}, serving the state "
            f"of `{serving.get('source')}` ({serving.get('memories')} side memories, {serving.get('edits')} "
            f"edits). Command: `{record['command']}`.",
            "",
            "| measurement | value |",
            "| --- | --- |",
        ]
        for name, row in (serving.get("throughput") or {}).items():
            lines.append(
                f"| served tokens/s, {name.replace('_', ' ')} ({row.get('requests')} requests) | "
                f"{_cell(row.get('tokens_per_second'), 1)} |"
            )
        if serving.get("routing_tokens_per_second_ratio") is not None:
            lines.append(
                f"| tokens/s ratio routed / main only | {_cell(serving['routing_tokens_per_second_ratio'], 2)} |"
            )
        for name, row in (serving.get("publish") or {}).items():
            lines.append(
                f"| publish latency, {name.replace('_', ' ')} ({row.get('bytes', 0) / 2**20:.2f} MiB) | "
                f"{row.get('seconds', float('nan')) * 1000:.0f} ms |"
            )
        lines += ["", f"Machine: {_machine_line(record.get('machine'))}.", ""]
    if not records:
        lines += [
            "**Not measured yet.** Serving tokens/s with and without routing and the publish latency come from "
            "`wisestream bench serving`, which writes `serving.json` here; no number is given until it exists.",
            "",
        ]
    return lines


def _merges_section(results: Path) -> list[str]:
    """One table per ``merges_*.json`` trace: what each merge did to the routing activations."""
    traces = [(p, _load(p)) for p in sorted(results.glob("merges_*.json"))]
    traces = [(p, t) for p, t in traces if t]
    if not traces:
        return []
    lines = [
        "## WISE-Merge: routing at each merge",
        "",
        "Routing activation (mean over the prompt's tokens of ||Delta a||, as the router computes it) of the "
        "memory each merge group started from, of the group's shards (mean over them) and of the merged "
        "memory, on unrelated prompts (the locality prompts of the dataset's first records) and on the merged "
        "memory's own edits; the threshold is act_ratio x the lowest of the latter. Unrelated prompts above the "
        "threshold are routed to the merged memory. The centred columns measure the merged memory on inputs "
        "minus the irrelevant pool's mean prompt activation (what a router subtracting that mean would see; "
        "not what the router does now).",
        "",
    ]
    for path, trace in traces:
        r = trace["result"]
        st = r["settings"]
        lines += [
            f"`{trace['command']}` ({r['run']}, {r['edits']} edits, {st['save_freq']}-edit shards merged every "
            f"{st['merge_freq']} edits, {r['probes']} unrelated prompts; `{path.name}`):",
            "",
            "| edits | started from: norm / unrelated | shards: unrelated / own edits | merged: norm | "
            "merged: unrelated | merged: edits min | threshold | unrelated routed | centred: unrelated / edits "
            "min / routed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for m in r["merges"]:
            shards, merged, c = m["shards"], m["merged"], m.get("centred")
            unrel = sum(x["unrelated"] for x in shards) / len(shards)
            own = sum(x["own_edits"] for x in shards) / len(shards)
            centred = (
                f"{_cell(c['unrelated'], 1)} / {_cell(c['edits_min'], 1)} / {_cell(c['unrelated_routed'], 2)}"
                if c
                else "–"
            )
            lines.append(
                f"| {m['edits']} | {_cell(m['base']['norm'], 1)} / {_cell(m['base']['unrelated'], 1)} | "
                f"{_cell(unrel, 1)} / {_cell(own, 1)} | {_cell(merged['norm'], 1)} | {_cell(merged['unrelated'], 1)} | "
                f"{_cell(merged['edits_min'], 1)} | {_cell(merged['threshold'], 1)} | "
                f"{_cell(merged['unrelated_routed'], 2)} | {centred} |"
            )
        lines += ["", f"Machine: {_machine_line(trace.get('machine'))}.", ""]
    return lines


def render_report(results: str | Path, planned: dict[str, list[int]] | None = None) -> Path:
    """Write ``REPORT.md`` and the ``retention_<dataset>.png`` plots under ``results``; returns the report path.

    Args:
        results: the results directory.
        planned: milestones each run ``method/dataset`` is configured to reach (for the status table).
    """
    results = Path(results)
    quality = collect_quality(results)
    machines = [r.get("machine") for d in quality.values() for m in d.values() for r in m.values()]
    lines = [
        "# wisestream benchmark report",
        "",
        "Generated by `wisestream bench report` from the results files in this directory; every number below "
        "names the command that produced it. Runs are resumable: rerunning a command continues it.",
        "",
        f"Machine (quality runs): {_machine_line(next((m for m in machines if m), None))}.",
        "",
        "## Status",
        "",
        *_status(quality, planned),
        "",
        "## Headline: every method at the largest T all have reached, and at the largest T it has reached",
        "",
        *headline_table(quality),
        "",
        "## Quality: sequential editing, retention over all T edits",
        "",
        "Model: SmolLM2-135M-Instruct (fp32), edited layer 23 (`mlp.down_proj`) for every method. Metrics as in "
        "the literature (defined in `../../docs/report.md`): Rel / Gen are the "
        "teacher-forced token accuracy of the target after the edit prompt / its rephrase, Loc the fraction of "
        "the locality answer's tokens whose argmax is unchanged from the pre-edit model; the (gen.) columns ask "
        "whether the greedy continuation contains the target. Each T is measured on the state after the "
        "first T edits of one sequential run, which equals an independent T-edit run (tested). s/edit is the "
        "wall-clock editing time per edit averaged over the run's first T edits, on 2 CPU cores shared with other "
        "work (other engineers' test suites ran at the same time): read it as rough. B/edit and % of model are "
        "what the edited layer holds to route and answer (side memories plus routing table or thresholds) per "
        "edit it holds (mixed near-miss edits included) and as a share of the model's parameter bytes, from the "
        "result's `memory` block; an en dash where the result has none (results written before it was recorded, "
        "methods without a side memory).",
        "",
    ]
    for dataset in sorted(quality):
        png = plot_retention(dataset, quality[dataset], results / f"retention_{dataset}.png")
        lines += [f"### {dataset}", "", *quality_table(quality[dataset]), ""]
        near = near_miss_table(quality[dataset])
        if near:
            lines += [
                "Near-miss edits mixed into the stream (`data/nearmiss_*.jsonl`: each one's locality prompt asks "
                "the same relation about a neighbouring subject), measured on their own after the run's T edits; "
                "the rows above leave them out:",
                "",
                *near,
                "",
            ]
        cost = milestone_cost_table(quality[dataset])
        if cost:
            lines += [
                "Cost at each milestone: the state's memory, and a served forward pass on that state, routed over "
                "main-only time (median of the result's `serving.repeats` alternating pairs, 8 x 32-token prefill "
                "and 32 one-token decode steps of the run's first edit prompts; milliseconds in brackets); "
                "evaluation s is the time the milestone's measurement took. *Loc, facts not edited* is the "
                "locality of the probes that ask no fact the run's own edits change (a probe whose prompt is "
                "another record's edit prompt, or names an edited subject and expects its pre-edit answer, must "
                "change: `bench.conflicts`); *Loc*, counting every probe, stays the headline. *Loc ceiling* is "
                "that locality had every probe on a fact not edited agreed with the pre-edit model, the probes on "
                "edited facts keeping the run's outcomes: the most an editor can score that answers the edited "
                "facts as this run does (`bench.conflicts.locality_ceiling`):",
                "",
                *cost,
                "",
            ]
        ages = age_table({m: quality[dataset][m] for m in _methods(quality[dataset])})
        if ages:
            lines += [
                "Retention by the age of an edit: each row is the state after T edits, each column the edits "
                "made between two milestones (Rel / Gen / Loc, teacher-forced, over those edits only). Down a "
                "column, what later edits did to earlier ones; along a row, old edits against recent ones:",
                "",
                *ages,
                "",
            ]
        lines += [f"![{dataset}]({png.name})", ""]
    lines += gate_section(_load(results / "gate.json"))
    lines += gate_section(
        _load(results / "gate_values.json"),
        title="Routing rules for the output-vector layout (keyed-values): development split only",
    )
    lines += gate_section(
        _load(results / "gate_residual.json"),
        title="The default's relation gate with the residual relation key (keyed-values-residual): chosen on the "
        "development split, measured on the 9,000-edit run re-keyed",
    )
    lines += values_section(_load(results / "values.json"))
    lines += relations_section(_load(results / "relations.json"))
    scale = _load(results / "scale.json")
    lines += scale_section(scale, results, _machine_line(scale.get("machine")) if scale else "")
    for extra in sorted(results.glob("scale_*.json")):  # further T's measured by a separate command
        rec = _load(extra) or {}
        r = rec.get("result") or {}
        lines += [
            f"Further rows: `{rec.get('command', '')}` (median of {r.get('repeats')} pairs, "
            f"{r.get('threads')} torch thread(s); machine: {_machine_line(rec.get('machine'))}):",
            "",
            *scale_table(r),
            "",
        ]
    lines += _merges_section(results)
    speed = edit_speed_section(
        _load(results / "engines.json"), _load(results / "profile.json"), _machine_line
    )
    lines += ["## Speed", "", *speed]
    lines += _speed_section(results)
    path = results / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path
