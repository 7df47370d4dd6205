"""The report's routing-rules section (whole names and the relation gate), from ``gate.json`` (``wisestream
bench gate``). Rendering only: every number comes from the results file."""

from __future__ import annotations

from typing import Any

from bench.conflicts import locality_ceiling
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


def _clean(m: dict[str, Any], key: str = "locality_others") -> str:
    return significant(((m or {}).get("conflicts") or {}).get(key), 3)


def _ceiling(m: dict[str, Any], probes: int) -> str:
    block = (m or {}).get("conflicts")
    loc = ((m or {}).get("teacher_forced") or {}).get("locality")
    return significant(locality_ceiling(block, loc, probes), 3) if block else MISSING


def _names(on: bool | None) -> str:
    return MISSING if on is None else ("on" if on else "off")


def _mean3(m: dict[str, Any]) -> str:
    tf = m.get("teacher_forced") or {}
    values = [tf.get(k) for k in _TF]
    return MISSING if None in values else significant(sum(values) / 3, 3)


def gate_section(
    result: dict[str, Any] | None, title: str = "Routing rules: whole names and the relation gate"
) -> list[str]:
    """Markdown lines under ``## title``: the development sweep, the chosen gate, and the test runs (if any) with
    the gate off and on."""
    if not result:
        return []
    dev, mix = result["dev"], result["dev"].get("mixed")
    lines = [
        f"## {title}",
        "",
        "Both rules only refuse routes (the main memory then answers, exactly as the unedited model does) and "
        "change nothing the edits wrote: one edited state is measured under each setting. Chosen on the "
        f"development split only: the first {dev['counterfact_edits']} CounterFact development records "
        f"(2000-2999) with the {mix} development edits mixed in ({dev['edits']} edits; each {mix} probe asks "
        f"another relation of its own edited subject), by the rule: {dev['rule']}. Command: "
        f"`{result.get('command', '')}`.",
        "",
    ]
    header = (
        f"| Rel | Gen | Rel (gen.) | Gen (gen.) | CounterFact Loc | {mix} Loc | CounterFact loc. routed |"
    )

    def dev_cells(row: dict[str, Any]) -> str:
        a, cf, mx = row["all"], row.get("counterfact"), row.get(mix)
        cells = (
            _cells(a, _TF[:2], "teacher_forced")
            + _cells(a, _FREE, "generate")
            + _cells(cf, ("locality",), "teacher_forced")
            + _cells(mx, ("locality",), "teacher_forced")
            + [_routed(cf, "locality")]
        )
        return " | ".join(cells) + " |"

    if dev.get("names_rows"):
        lines += [
            "**Whole names** (`wise.keyed.whole_names`): a subject found inside a longer name (`Ireland` in "
            f"`Jill Ireland`, `Daniel` in `Daniel Tammet`) does not route. Chosen: **{_names(dev.get('names_chosen'))}**.",
            "",
            "| whole names " + header,
            "|" + " --- |" * 8,
        ]
        lines += [f"| {_names(row['whole_names'])} | " + dev_cells(row) for row in dev["names_rows"]]
        lines.append("")
    lines += [
        "**Relation gate** (`wise.keyed.min_similarity`): a query naming an edited subject is answered by that "
        "edit only when the cosine of its relation key to the edit's reaches the gate. Every gate value's "
        "outcomes follow from one measurement with the gate off and the pre-edit probes (tested against "
        "evaluations with the gate set); swept with the whole-name setting chosen above. Chosen: "
        f"**{_gate(dev['chosen'])}**.",
        "",
        "| gate " + header,
        "|" + " --- |" * 8,
    ]
    lines += [f"| {_gate(row['gate'])} | " + dev_cells(row) for row in dev["rows"]]
    if result.get("test"):
        lines += [
            "",
            "The runs' final states under each setting (their own edits, never looked at while choosing). The gate "
            "costs no memory; whole names add one flag byte per vocabulary token to the routing table, once; "
            "neither changes the routed forward's time measurably (`wisestream bench scale`).",
            "",
            "| run | T | whole names | gate | Rel | Gen | Loc | Rel (gen.) | Gen (gen.) | mean | locality routed "
            "| Loc, no conflict | Loc, facts not edited | Loc ceiling |",
            "|" + " --- |" * 14,
        ]
        for name, test in result["test"].items():
            for row in test["rows"]:
                m = row["metrics"]
                cells = _cells(m, _TF, "teacher_forced") + _cells(m, _FREE, "generate")
                run = f"{name} (re-keyed)" if row.get("rekeyed") else name
                lines.append(
                    f"| {run} | {test['T']} | {_names(row.get('whole_names'))} | {_gate(row['gate'])} | "
                    + " | ".join(
                        cells
                        + [_mean3(m), _routed(m, "locality"), _clean(m), _clean(m, "locality_unedited_facts")]
                        + [_ceiling(m, test["T"])]
                    )
                    + " |"
                )
        for name, test in result["test"].items():
            mem, srv = test.get("memory"), test.get("serving")
            if mem and srv:
                lines += [
                    "",
                    f"{name} re-keyed costs {mem['bytes_per_edit'] / 1024:.1f} KiB per edit, "
                    f"{mem['percent_of_model']:.2f}% of the model; its routed forward takes "
                    f"{1 + srv['prefill']:.2f}x / {1 + srv['decode']:.2f}x the unedited one (prefill / decode).",
                ]
        conflicts = ", ".join(
            f"{n} {t['rows'][0]['metrics'].get('conflicts', {}).get('probes', MISSING)} of {t['T']}"
            for n, t in result["test"].items()
        )
        facts = ", ".join(
            f"{n} {t['rows'][0]['metrics'].get('conflicts', {}).get('edited_facts', MISSING)} of {t['T']}"
            for n, t in result["test"].items()
        )
        checks = ", ".join(f"{n} {t['ungated_vs_result']:.1e}" for n, t in result["test"].items())
        measured = ", ".join(f"{n} {t.get('free_generation_measured', 0)}" for n, t in result["test"].items())
        rekeyed = [n for n, t in result["test"].items() if t.get("rekeyed")]
        lines += [
            "",
            "Each run's state routed as its milestone result routed it, remeasured here against that result "
            f"(largest absolute difference of a teacher-forced metric): {checks}. Free-generation outcomes under "
            "another setting are the milestone's where a probe goes to the same edit as in the result and the "
            "pre-edit model's where the setting sends it to the main memory; probes routed to another edit are "
            f"measured ({measured}). "
            + (
                f"*Re-keyed* ({', '.join(rekeyed)}): the run's state with this benchmark's relation key, each "
                "edit's key computed again from the prompt and subject the state stores (the same edits: the "
                "key changes no weight an edit writes; `KeyedEditor.load_rekeyed`, tested equal to editing with "
                "that key). "
                if rekeyed
                else ""
            )
            + "*Loc, no conflict*: locality over the probes whose prompt is not itself an edit prompt of the run; "
            "the others ask the model to keep an answer that the stream changed on purpose "
            f"({conflicts} locality probes). *Loc, facts not edited* also leaves out the probes that name the "
            "subject of an edit of the run and expect that edit's pre-edit answer: they ask a fact the stream "
            f"changed, however worded ({facts} probes with the former; a text heuristic, `bench.conflicts.edited_facts`). "
            "The literature's locality (*Loc*) counts them all and stays the headline. *Loc ceiling*: that "
            "locality had every probe on a fact not edited agreed with the pre-edit model, the probes on edited "
            "facts keeping the run's outcomes (`bench.conflicts.locality_ceiling`): the most an editor can score "
            "that answers the edited facts as this run does.",
        ]
    return lines + [""]


def values_section(result: dict[str, Any] | None) -> list[str]:
    """Markdown lines: the output-vector settings tried on the development split and the one chosen
    (``values.json``, ``wisestream bench values``)."""
    if not result:
        return []
    lines = [
        "## Output vectors: chosen on the development split",
        "",
        f"Each setting edits the gate benchmark's development stream ({result['edits']} edits: CounterFact "
        "development records with the same-subject development edits mixed in) into its own state; whole names "
        f"on, no gate. Rule: {result['rule']}. Command: `{result.get('command', '')}`.",
        "",
        "| wise.keyed | Rel | Gen | Loc | mean | Rel (gen.) | Gen (gen.) | CounterFact Gen | CounterFact Loc "
        "| same-subject Loc | optimizer steps per edit |",
        "|" + " --- |" * 11,
    ]
    for row in result["rows"]:
        keyed = ", ".join(f"{k}: {v}" for k, v in row["keyed"].items())
        mark = " (chosen)" if row["keyed"] == result["chosen"] else ""
        cf, same = row.get("counterfact") or {}, row.get("samesubject") or {}
        cells = [
            *_cells(row["all"], _TF, "teacher_forced"),
            _mean3(row["all"]),
            *_cells(row["all"], _FREE, "generate"),
            *_cells(cf, ("generalization", "locality"), "teacher_forced"),
            *_cells(same, ("locality",), "teacher_forced"),
            significant(row.get("steps_per_edit"), 2),
        ]
        lines.append(f"| {keyed}{mark} | " + " | ".join(cells) + " |")
    return lines + [""]


_KEY_TEXT = {
    "router": "router (mean over the prompt besides the subject; the gate's key)",
    "sentence": "mean from the subject's sentence on",
    "last": "edited projection's input at the last token",
    "residual_last": "residual stream at the last token",
    "residual_projected": "the same, projected to the router's key size",
    "answer": "unedited next-token distribution (not a one-pass key)",
}


def relations_section(result: dict[str, Any] | None) -> list[str]:
    """Markdown lines: how well each relation key separates rephrases from other relations of a subject
    (``relations.json``, ``wisestream bench relations``)."""
    if not result:
        return []
    keep = [t["keep"] for t in next(iter(result["keys"].values()))["thresholds"]]
    lines = [
        "## Relation keys: rephrases against other relations of a subject (development split only)",
        "",
        f"{result['rephrases']:,} rephrases of {result['dev_records']:,} CounterFact development records and "
        f"{result['other_records']:,} same-subject development edits (positives: edit prompt and its rephrase) "
        f"against {result['other_relations']} prompts asking another relation of the same subject (negatives), "
        "keys computed on the unedited model. AUC: share of positive-negative pairs the key orders right; "
        "*refused at keep q*: share of other-relation prompts below the threshold that keeps a share q of the "
        f"rephrases. Command: `{result.get('command', '')}`.",
        "",
        "| key | AUC | " + " | ".join(f"refused at keep {q:g}" for q in keep) + " |",
        "|" + " --- |" * (2 + len(keep)),
    ]
    for name, row in result["keys"].items():
        cells = [significant(row["auc"], 3), *(significant(t["refused"], 2) for t in row["thresholds"])]
        lines.append(f"| {_KEY_TEXT.get(name, name)} | " + " | ".join(cells) + " |")
    share = result.get("answer_disjoint")
    if share is not None:
        lines += [
            "",
            f"{100 * share:.0f}% of the rephrases get an unedited next-token distribution that shares almost "
            "nothing with their edit prompt's (cosine below 0.05): some reword the prompt so that another word "
            "comes next, others ask another attribute of the subject, and generalization counts all of them as "
            "the edit's. Lowest first:",
            "",
            "| edit prompt | rephrase | cosine |",
            "| --- | --- | --- |",
        ]
        for ex in result.get("examples", []):
            lines.append(f"| {ex['prompt']} | {ex['rephrase']} | {ex['answer_cosine']:.3f} |")
    return lines + [""]
