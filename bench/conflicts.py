"""Locality probes that ask a fact the stream itself changed.

Locality asks the edited model to keep the pre-edit answer of a prompt unrelated to the record's edit. In a long
CounterFact stream some of those prompts are not unrelated to the *stream*: another record edits the very fact they
ask (its locality prompt is another record's edit prompt, or it names another record's subject and expects that
record's pre-edit answer). A correct editor must change those answers, so the literature's locality, which counts
every probe, is capped below 1 by the stream's own content. The reports keep that locality as the headline and give
the locality of the other probes beside it (:func:`locality_split`); a quality milestone result keeps the split as
its ``conflicts`` block (:func:`per_edit_conflicts`, :func:`annotate_results`). The split also bounds what any
editor could score on the stream (:func:`locality_ceiling`): every probe on a fact not edited agreeing, the probes
on edited facts keeping the run's outcomes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.milestones import write_json

logger = logging.getLogger(__name__)

_WORD = re.compile(r"\w+(?:['.-]\w+)*")


def edited_facts(records: Sequence) -> set[int]:
    """Indices of the records whose locality probe asks a fact another record of ``records`` edits: the probe's
    prompt names that record's subject (whole words) and expects that record's pre-edit answer
    (``ground_truth``), which the stream changed on purpose (``Renault 8 is made by`` expecting Renault, when
    another record edits Renault 8's maker from Renault to Fiat). A text heuristic: records without a subject or
    a ground truth never count."""
    facts: dict[tuple[str, ...], set[tuple[str, int]]] = {}
    for i, r in enumerate(records):
        if getattr(r, "subject", None) and getattr(r, "ground_truth", None):
            key = tuple(_WORD.findall(r.subject))
            facts.setdefault(key, set()).add((r.ground_truth.strip().lower(), i))
    longest = max((len(k) for k in facts), default=0)
    out = set()
    for i, r in enumerate(records):
        if not r.locality_prompt or not r.locality_answer:
            continue
        words = _WORD.findall(r.locality_prompt)
        answer = r.locality_answer.strip().lower()
        spans = (tuple(words[a : a + n]) for n in range(1, longest + 1) for a in range(len(words) - n + 1))
        if any(a == answer and j != i for span in spans for a, j in facts.get(span, ())):
            out.add(i)
    return out


def locality_split(values: Sequence[float], owners: Iterable[int], records: Sequence) -> dict[str, Any]:
    """The ``conflicts`` block of locality outcomes ``values`` (one per probe; ``owners[k]`` is the index in
    ``records`` of probe ``k``'s record) over the run's edits ``records``:

    ``probes``: how many probes' prompt is itself an edit prompt of ``records`` (same normalisation as
    superseding), ``locality_others`` the locality of the rest; ``edited_facts``: how many probes ask a fact some
    record edits (an edit prompt, or :func:`edited_facts`), ``locality_unedited_facts`` the locality of the rest;
    ``locality_probes``: how many probes there are, ``locality_ceiling`` the :func:`locality_ceiling` of the run.
    A locality is None when no probe is left."""
    from wise.keyed.trainer import normalize_prompt

    owners = list(owners)
    edited = {normalize_prompt(r.prompt) for r in records}
    facts = edited_facts(records)
    prompt_hit = [normalize_prompt(records[o].locality_prompt) in edited for o in owners]
    clean = [v for v, hit in zip(values, prompt_hit, strict=True) if not hit]
    unedited = [v for v, hit, o in zip(values, prompt_hit, owners, strict=True) if not hit and o not in facts]
    return {
        "probes": len(values) - len(clean),
        "locality_others": sum(clean) / len(clean) if clean else None,
        "edited_facts": len(values) - len(unedited),
        "locality_unedited_facts": sum(unedited) / len(unedited) if unedited else None,
        "locality_probes": len(values),
        "locality_ceiling": (len(unedited) + sum(values) - sum(unedited)) / len(values) if values else None,
    }


def locality_ceiling(block: dict[str, Any], locality: float | None, probes: int) -> float | None:
    """The literature's locality (every probe counted) of the run had every probe on a fact not edited agreed with
    the pre-edit model, the probes on edited facts keeping the run's outcomes: ``locality + (1 - U) (n - e) / n``
    for the split ``block`` (``U`` its ``locality_unedited_facts``, ``e`` its ``edited_facts``) of ``n`` probes
    (the block's ``locality_probes``, else ``probes``). An editor that changes the edited facts as the run did
    cannot score more; one that changes them more fully scores less. None when a number is missing."""
    if "locality_ceiling" in block:
        return block["locality_ceiling"]
    n = block.get("locality_probes", probes)
    unedited, edited = block.get("locality_unedited_facts"), block.get("edited_facts")
    if locality is None or edited is None or not n:
        return None
    if unedited is None:  # every probe asks an edited fact
        return locality
    return locality + (1.0 - unedited) * (n - edited) / n


def per_edit_conflicts(per_edit: Sequence[dict], records: Sequence) -> dict[str, Any] | None:
    """:func:`locality_split` of a milestone result's ``per_edit`` rows (one locality value per record: the mean
    of its locality probes) over the records they name (``records`` holds them, in any order). None when no row
    has a locality or a row names a record ``records`` lacks."""
    by_id = {r.id: r for r in records}
    if any(row.get("id") not in by_id for row in per_edit):
        return None
    run = [by_id[row["id"]] for row in per_edit]
    kept = [(i, row["locality"]) for i, row in enumerate(per_edit) if row.get("locality") is not None]
    if not kept:
        return None
    return locality_split([v for _, v in kept], [i for i, _ in kept], run)


def annotate_results(results_dir: str | Path, records: Sequence) -> list[int]:
    """Give every milestone result ``T*.json`` under ``results_dir`` that has ``per_edit`` rows but no
    ``conflicts`` block, or one written before the split kept its ceiling, its block; returns the T's annotated.
    ``records``: the run's edits (a superset of those the results name)."""
    done = []
    for path in sorted(Path(results_dir).glob("T*.json")):
        result = json.loads(path.read_text())
        if not result.get("per_edit") or "locality_ceiling" in (result.get("conflicts") or {}):
            continue
        block = per_edit_conflicts(result["per_edit"], records)
        if block is None:
            continue
        result["conflicts"] = block
        write_json(path, result)
        done.append(int(path.stem[1:]))
    if done:
        logger.info("%s: locality conflicts added to the results of T=%s", results_dir, done)
    return done
