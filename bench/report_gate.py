"""The report's relation-gate section, from ``gate.json`` (``wisestream bench gate``). Rendering only: every
number comes from the results file."""

from __future__ import annotations

from typing import Any

from bench.report_cost import MISSING, significant

_TF, _FREE = ("reliability", "generalization", "locality"), ("reliability", "generalization")


def _gate(g: float | None) -> str:
    return "off" if g is None else f"{g:g}"


def _cells(m: dict[str, Any] | None, keys: tuple[str, ...], group: str) -> list[str]:
    block = (m or {}).get(group) or {}
    return [significant(block.get(k), 3) for k in keys]


def _routed(m: dict[str, Any] | None, kind: str) -> str:
    value = ((m or {}).get("routed_fraction") or {}).get(kind)
    return MISSING if value is None else f"{100 * value:.1f}%"


def _mean3(m: dict[str, Any]) -> str:
    tf = m.get("teacher_forced") or {}
    values = [tf.get(k) for k in _TF]
    return MISSING if None in values else significant(sum(values) / 3, 3)


def gate_section(result: dict[str, Any] | None) -> list[str]:
    """Markdown lines: the development sweep, the chosen gate, and the test runs with the gate off and on."""
    if not result:
        return []
    dev, mix = result["dev"], result["dev"].get("mixed")
    lines = [
        "## Relation gate (`wise.keyed.min_similarity`)",
        "",
        "A query naming an edited subject is answered by that edit only when the cosine of its relation key to "
        "the edit's reaches the gate; below it, the main memory answers. Every gate value's outcomes follow "
        "from one measurement with the gate off and the pre-edit probes (tested against evaluations with the "
        "gate set). Chosen on the development split only: the first "
        f"{dev['counterfact_edits']} CounterFact development records (2000-2999) with the {mix} development "
        f"edits mixed in ({dev['edits']} edits; each {mix} probe asks another relation of its own edited "
        f"subject), by the rule: {dev['rule']}. Chosen: **{_gate(dev['chosen'])}**. Command: "
        f"`{result.get('command', '')}`.",
        "",
        f"| gate | Rel | Gen | Rel (gen.) | Gen (gen.) | CounterFact Loc | {mix} Loc | CounterFact loc. routed |",
        "|" + " --- |" * 8,
    ]
    for row in dev["rows"]:
        a, cf, mx = row["all"], row.get("counterfact"), row.get(mix)
        lines.append(
            f"| {_gate(row['gate'])} | "
            + " | ".join(
                _cells(a, _TF[:2], "teacher_forced")
                + _cells(a, _FREE, "generate")
                + _cells(cf, ("locality",), "teacher_forced")
                + _cells(mx, ("locality",), "teacher_forced")
                + [_routed(cf, "locality")]
            )
            + " |"
        )
    if result.get("test"):
        lines += [
            "",
            "The runs' final states with the gate off and at the chosen gate (their own edits, never looked at "
            "while choosing); memory and serving cost do not change with the gate (one comparison per query):",
            "",
            "| run | T | gate | Rel | Gen | Loc | Rel (gen.) | Gen (gen.) | mean | locality routed |",
            "|" + " --- |" * 10,
        ]
        for name, test in result["test"].items():
            for row in test["rows"]:
                m = row["metrics"]
                cells = _cells(m, _TF, "teacher_forced") + _cells(m, _FREE, "generate")
                lines.append(
                    f"| {name} | {test['T']} | {_gate(row['gate'])} | "
                    + " | ".join(cells + [_mean3(m), _routed(m, "locality")])
                    + " |"
                )
        checks = ", ".join(f"{n} {t['ungated_vs_result']:.1e}" for n, t in result["test"].items())
        lines += [
            "",
            "Gate off, remeasured here against the run's milestone result (largest absolute difference of a "
            f"teacher-forced metric): {checks}.",
        ]
    return lines + [""]
