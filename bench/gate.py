"""The keyed layout's routing rules, chosen on the development split, then measured on a finished run's state
(``wisestream bench gate``; config ``configs/bench/gate.yaml``): whole names (``wise.keyed.whole_names``: a
subject found inside a longer name does not route) and the relation gate (``wise.keyed.min_similarity``).
Neither changes what the edits wrote, so one edited state serves every setting.

Whole names: the development edits are probed with the rule off and on (free generation included); the rule is
kept when no reliability or generalization metric falls more than ``tolerance``. The test runs are probed both
ways (teacher-forced); the free-generation outcome of a probe whose route the rule leaves alone is the run's
milestone one, of a probe the rule sends to the main memory its pre-edit one, and any other is measured.

A query whose subject matches an edit is answered by that edit only when the cosine of its relation key to the
edit's reaches the gate; otherwise the main memory answers it, exactly as the unedited model does. So the gated
outcome of every probe is its ungated outcome when it was routed with a similarity at or above the gate, and its
pre-edit outcome otherwise: one measurement with the gate off plus the pre-edit probes give every gate value at
once, with no forward pass per value. The gate is swept with the whole-name setting chosen before it.

Development: the first ``dev_limit`` records of the development CounterFact split with the development
same-subject edits mixed in (each probes another relation of its own edited subject: the question a gate
should refuse) are edited once with the method's settings (resumable); the gate chosen is the highest value of
the grid at which no reliability or generalization metric (teacher-forced or free generation, over all
development edits) falls more than ``tolerance`` below the ungated one. Test: the runs of ``apply`` are measured
at their final state with the gate off (teacher-forced probes; their free-generation outcomes come from the
run's milestone result) and combined with the pre-edit probes the quality benchmark kept.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from bench.carry import unpack
from bench.conflicts import locality_split
from bench.milestones import edit_until, milestone_path, resume_editor, write_json
from bench.quality import (
    DatasetSpec,
    MixSpec,
    QualityConfig,
    dataset_records,
    interleave,
    keyed_method,
    load_spec,
    plan_mixed,
    plan_run,
    pre_probes_dir,
)
from orchestrator.config import ConfigError
from wise.config import FrozenConfig

logger = logging.getLogger(__name__)

KINDS = (("rel", "edit", "rel_hit"), ("gen", "rephrase", "gen_hit"), ("loc", "locality", None))


class GateSpec(FrozenConfig):
    """Where the relation gate is chosen and where it is measured."""

    quality: str = Field("configs/bench/quality.yaml", description="the quality benchmark: model, runs, work")
    output: str = Field("benchmarks/results/gate.json", description="the result (committed)")
    method: str = Field("keyed", description="the method (keyed layout) whose gate is chosen")
    dev: DatasetSpec = Field(description="development edits (never reported)")
    dev_limit: int = Field(300, ge=1, description="edit the first this many development records")
    mix: MixSpec | None = Field(None, description="development records mixed in (same-subject probes)")
    grid: tuple[float, ...] = Field(description="gate values tried, increasing")
    tolerance: float = Field(0.02, ge=0, description="largest fall of any rel/gen metric the gate may cost")
    apply: tuple[str, ...] = Field(
        (),
        description="runs METHOD/DATASET measured at their final state; a run of another method whose "
        "settings differ in the relation key only is re-keyed with this one's",
    )
    checkpoint_every: int = Field(25, ge=1)


def load_gate_config(path: str | Path) -> GateSpec:
    """Load ``configs/bench/gate.yaml``.

    Raises:
        ConfigError: unknown keys or bad values, with the key path.
    """
    return load_spec(GateSpec, path)


def routing_tag(flags) -> str:
    """The cache name part of a whole-name setting (probes measured under one are not the other's)."""
    return "plain" if flags is None else "names"


def within(row: dict[str, Any], base: dict[str, Any], tolerance: float) -> bool:
    """No reliability or generalization metric (teacher-forced or free generation) of ``row`` falls more than
    ``tolerance`` below ``base``'s (both :func:`metrics_row`)."""
    return all(
        row[mode][m] >= base[mode][m] - tolerance
        for mode in ("teacher_forced", "generate")
        if mode in base
        for m in ("reliability", "generalization")
    )


def gate_probes(post: dict, pre: dict, gate: float | None) -> dict:
    """The probes as they come out with the relation gate at ``gate`` (None: off), from the same records'
    ungated probes ``post`` and pre-edit probes ``pre`` (both as :func:`wise.evaluate.probe_records` gives
    them; ``post``'s ratio is 1 + the routed relation similarity, 0 for the main memory). A probe that ``post``
    sends to the main memory already has its pre-edit outcome there: ``pre`` is read only for the probes the gate
    refuses (:func:`refused`)."""
    out = {k: v for k, v in post.items() if k not in ("route", "ratio")}
    out["route"], out["ratio"] = {}, {}
    for key, kind, hit in KINDS:
        route, ratio = post["route"][kind], post["ratio"][kind]
        cut = refused(route, ratio, gate)
        out[key] = [b if c else a for a, b, c in zip(post[key], pre[key], cut, strict=True)]
        out["route"][kind] = [-1 if c else r for r, c in zip(route, cut, strict=True)]
        out["ratio"][kind] = [0.0 if c or r < 0 else q for r, q, c in zip(route, ratio, cut, strict=True)]
        if hit and hit in post:
            out[hit] = [b if c else a for a, b, c in zip(post[hit], pre[hit], cut, strict=True)]
    return out


def refused(route: Sequence[int], ratio: Sequence[float], gate: float | None) -> list[bool]:
    """Per probe, whether the gate refuses the edit it was routed to (its relation similarity, ratio - 1, is
    below the gate)."""
    return [gate is not None and r >= 0 and q - 1.0 < gate for r, q in zip(route, ratio, strict=True)]


def probe_slots(probes: dict, key: str) -> list[tuple[int, int]]:
    """(record, how many earlier probes of the same record) per probe of ``key``: a probe's place whatever
    slice of records it was measured in."""
    seen: Counter[int] = Counter()
    out = []
    for o in probes.get(f"{key}_owner", range(probes["records"])):
        out.append((o, seen[o]))
        seen[o] += 1
    return out


def pre_for(shape: dict, sub: dict, wanted: Sequence[int]) -> dict:
    """Probes shaped as ``shape`` (probes of all records) holding ``sub``'s outcomes, measured on the records
    ``wanted`` (sorted) only, at those records' probes and NaN elsewhere: the pre-edit probes a gate reads
    (:func:`gate_probes`), or the outcomes :func:`derive_free` measures."""
    local = {o: j for j, o in enumerate(wanted)}
    out: dict = {"records": shape["records"]}
    for key, _kind, hit in KINDS:
        where = {place: j for j, place in enumerate(probe_slots(sub, key))}
        index = [where.get((local[o], n)) if o in local else None for o, n in probe_slots(shape, key)]
        for name in (key, hit):
            if name and name in shape:
                have = name in sub
                out[name] = [sub[name][j] if have and j is not None else float("nan") for j in index]
    return out


def metrics_row(probes: dict, records: Sequence) -> dict[str, Any]:
    """Teacher-forced and free-generation metrics and routed fractions of ``probes`` over ``records``, and
    ``conflicts``: the locality probes whose prompt is itself an edit prompt of ``records`` (the stream changed
    the answer they expect the model to keep; same normalisation as superseding) and the locality of the others;
    then, more broadly, the probes asking a fact some record edits (:func:`bench.conflicts.locality_split`) and
    the locality of the rest."""
    from wise.evaluate import summarize_probes

    s = summarize_probes(probes, records)
    row = {k: s[k] for k in ("teacher_forced", "generate", "routed_fraction") if k in s}
    row["conflicts"] = locality_split(
        probes["loc"], probes.get("loc_owner", range(probes["records"])), records
    )
    return row


def choose_gate(rows: Sequence[dict[str, Any]], tolerance: float) -> float | None:
    """The highest gate whose reliability and generalization (teacher-forced and free generation) each stay
    within ``tolerance`` of the ungated row's (``rows[0]``, gate None); None when no gate does."""
    ok = [r["gate"] for r in rows[1:] if within(r["all"], rows[0]["all"], tolerance)]
    return max(ok) if ok else None


def _split(probes: dict, first: int) -> tuple[dict, dict]:
    """Probes of records ``[:first]`` and ``[first:]`` (owners renumbered; a prompt probe's owner is its index)."""
    a: dict = {"records": first, "route": {}, "ratio": {}}
    b: dict = {"records": probes["records"] - first, "route": {}, "ratio": {}}
    for key, kind, hit in KINDS:
        owner = probes.get(f"{key}_owner", range(probes["records"]))
        cut = sum(1 for o in owner if o < first)
        lists = [(a, b, key, probes[key])] + ([(a, b, hit, probes[hit])] if hit and hit in probes else [])
        lists += [(a["route"], b["route"], kind, probes["route"][kind])]
        lists += [(a["ratio"], b["ratio"], kind, probes["ratio"][kind])]
        for lo, hi, name, values in lists:
            lo[name], hi[name] = values[:cut], values[cut:]
        if f"{key}_owner" in probes:
            a[f"{key}_owner"], b[f"{key}_owner"] = list(owner[:cut]), [o - first for o in owner[cut:]]
    return a, b


def _ordered(records: Sequence, mixed_ids: set) -> tuple[list, int]:
    """The development records with the mixed ones last (so that one cut separates them), and the cut."""
    own = [r for r in records if r.id not in mixed_ids]
    return own + [r for r in records if r.id in mixed_ids], len(own)


def _dev_rows(probes: dict, records: Sequence, cut: int, mix_name: str | None) -> dict[str, Any]:
    """Metrics of all development edits, of the CounterFact ones and of the mixed ones."""
    own, mix = _split(probes, cut)
    row = {"all": metrics_row(probes, records), "counterfact": metrics_row(own, records[:cut])}
    if mix_name:
        row[mix_name] = metrics_row(mix, records[cut:])
    return row


def develop(
    qcfg: QualityConfig, spec: GateSpec, settings, make, work: Path, pre_cache: Path | None = None
) -> dict[str, Any]:
    """Edit the development records once (resumable), probe them with whole names off and on and on the
    pre-edit model (kept in ``pre_cache``, by default beside the state: they do not depend on the settings),
    choose whole names, then measure every gate of the grid: rows for all development edits, the CounterFact
    ones and the mixed ones, and the settings chosen."""
    from wise.evaluate import cached_probes
    from wise.keyed.names import name_flags

    main = dataset_records(spec.dev, spec.dev_limit)
    mixed = (
        dataset_records(DatasetSpec(path=spec.mix.path, format=spec.mix.format), 10**9) if spec.mix else []
    )
    stream = interleave(main, mixed, spec.mix.within) if spec.mix else main
    fingerprint = {
        "settings": settings.model_dump(mode="json"),
        "records": [r.id for r in stream],
        "model": qcfg.model.model_dump(),
    }
    work_dir = work / "gate-dev" / spec.method
    editor, progress = resume_editor(make, work_dir, fingerprint)
    edit_until(editor, stream, len(stream), progress, work_dir, spec.checkpoint_every)
    records, cut = _ordered(stream, {r.id for r in mixed})
    mix_name = spec.mix.name if spec.mix else None
    args = (editor.model, editor.routed, editor.tokens, records)
    posts, names_rows = {}, []
    for flags in (None, name_flags(editor.tokens.tokenizer)):
        with editor.routed.names(flags):
            cache = work_dir / f"probes-post-{routing_tag(flags)}"
            posts[flags is not None] = cached_probes(
                *args, cache=cache, generate=qcfg.generate, progress=True
            )
        names_rows.append(
            {"whole_names": flags is not None, **_dev_rows(posts[flags is not None], records, cut, mix_name)}
        )
    names = within(names_rows[1]["all"], names_rows[0]["all"], spec.tolerance)
    logger.info("whole names chosen on the development split: %s", names)
    pre = cached_probes(
        *args,
        cache=pre_cache or work_dir / "probes-pre",
        main_only=True,
        generate=qcfg.generate,
        progress=True,
    )
    rows = [
        {"gate": gate, **_dev_rows(gate_probes(posts[names], pre, gate), records, cut, mix_name)}
        for gate in (None, *spec.grid)
    ]
    chosen = choose_gate(rows, spec.tolerance)
    logger.info("gate chosen on the development split: %s", chosen)
    return {
        "edits": len(stream),
        "counterfact_edits": cut,
        "mixed": mix_name,
        "seconds_per_edit": progress["edit_seconds"] / max(1, progress["applied"]),
        "steps_per_edit": sum(progress["steps"]) / max(1, len(progress["steps"])),
        "names_rows": names_rows,
        "names_chosen": names,
        "rows": rows,
        "chosen": chosen,
        "rule": f"the setting whose rel and gen (teacher-forced and free generation) stay within "
        f"{spec.tolerance} of the rule off over all development edits: whole names on if it does, then "
        f"the highest such gate",
    }


def derive_free(on: dict, off: dict, pre: dict, measure) -> int:
    """Fill ``on``'s free-generation outcomes (``rel_hit``/``gen_hit``) from ``off``'s where the two settings
    route a probe alike, from ``pre``'s where ``on`` sends it to the main memory, and from ``measure(indices)``
    (probes of those records under ``on``, free generation included) for the rest. Returns how many were
    measured."""
    todo: dict[str, list[int]] = {}
    for key, kind, hit in KINDS[:2]:
        values = []
        for i, (a, b) in enumerate(zip(on["route"][kind], off["route"][kind], strict=True)):
            values.append(off[hit][i] if a == b else pre[hit][i] if a < 0 else None)
            if values[-1] is None:
                todo.setdefault(key, []).append(i)
        on[hit] = values
    if not todo:
        return 0

    wanted = sorted({probe_slots(on, key)[i][0] for key, idx in todo.items() for i in idx})
    placed = pre_for(on, measure(wanted), wanted)
    for key, _kind, hit in KINDS[:2]:
        for i in todo.get(key, ()):
            on[hit][i] = placed[hit][i]
    return sum(len(v) for v in todo.values())


def _finished_run(qcfg: QualityConfig, run_name: str, work: Path) -> tuple[Any, Path, int, list, Path, dict]:
    """A finished quality run: (run, its work dir, edits its state holds, its own records, its milestone result's
    path, that result). A run carried in the repository is restored first.

    Raises:
        ConfigError: unknown run, no state, or no milestone result for its state.
    """
    runs = {r.name: r for r in qcfg.runs}
    if run_name not in runs:
        raise ConfigError(f"gate.apply: unknown run {run_name!r}; choose among {sorted(runs)}")
    run = runs[run_name]
    work_dir = work / run.dataset / run.method
    if qcfg.carry:
        unpack(Path(qcfg.carry) / run.dataset / run.method, work_dir)
    progress_path = work_dir / "progress.json"
    if not progress_path.exists():
        raise ConfigError(
            f"gate.apply: {run_name} has no state in {work_dir} (run `wisestream bench quality`)"
        )
    n = json.loads(progress_path.read_text())["applied"]
    _, records = plan_run(qcfg, run)
    mixed_ids = {r.id for r in plan_mixed(qcfg, run)}
    own = [r for r in records[:n] if r.id not in mixed_ids]
    result_path = milestone_path(Path(qcfg.output) / "quality" / run.dataset / run.method, len(own))
    if not result_path.exists():
        raise ConfigError(f"gate.apply: {run_name} has no result at T={len(own)} ({result_path})")
    return run, work_dir, n, own, result_path, json.loads(result_path.read_text())


def _carry_free_outcomes(carrier: dict, result: dict, own: Sequence, run_name: str) -> None:
    """Give ``carrier`` (probes routed as the milestone ``result`` routed them) that result's free-generation
    outcomes, one reliability and one generalization outcome per edit."""
    if len(carrier["gen_owner"]) != len(own):
        raise ConfigError(f"gate.apply: {run_name}: free generation needs one rephrase per edit")
    carrier["rel_hit"] = [e["generate_reliability"] for e in result["per_edit"]]
    carrier["gen_hit"] = [e["generate_generalization"] for e in result["per_edit"]]


def pre_needed(posts: Iterable[dict], carrier: dict, gate: float | None) -> list[int]:
    """The records whose pre-edit outcomes some setting reads: a probe the gate refuses, or (for free
    generation) one a setting sends to the main memory while the result (``carrier``) routed it."""
    wanted: set[int] = set()
    for post in posts:
        for key, kind, _hit in KINDS:
            owners = probe_slots(post, key)
            cut = refused(post["route"][kind], post["ratio"][kind], gate)
            routed_then = carrier["route"][kind]
            for (o, _), c, r, then in zip(owners, cut, post["route"][kind], routed_then, strict=True):
                if c or r < 0 <= then:
                    wanted.add(o)
    return sorted(wanted)


def _state_cost(editor, gate: float | None, own: Sequence) -> dict[str, Any]:
    """The memory and routed-forward cost of ``editor``'s state with ``gate`` set."""
    from bench.quality import model_bytes, serving_cost
    from orchestrator.report import memory_cost

    editor.routed.min_similarity = gate
    return {
        "memory": memory_cost(*editor.state_dict(), model_bytes(editor.model)),
        "serving": serving_cost(editor, own),
    }


def measure_run(
    qcfg: QualityConfig,
    run_name: str,
    names: bool,
    gate: float | None,
    make,
    work: Path,
    make_own=None,
) -> dict[str, Any]:
    """A finished run's final state with whole names off and on, and with the settings chosen: its own edits'
    metrics, from teacher-forced probes measured here, the free-generation outcomes of its milestone result
    (for the probes routed as the result routed them; the others derived by :func:`derive_free`) and the
    pre-edit probes kept by the quality benchmark (measured here for the records :func:`pre_needed` names).

    ``make`` builds the editor of the gate's method. When ``make_own`` is given it builds the editor of the
    run's own method, whose settings differ from the gate's in the relation key only: the run's state is then
    re-keyed (:meth:`~wise.keyed.editor.KeyedEditor.load_rekeyed`: the same edits, the keys the gate's method
    stores) and measured with the whole-name setting chosen only, ungated and gated, after a row of the run as
    its result routed it (its own keys); those probes carry the result's free-generation outcomes.

    Raises:
        ConfigError: unknown run, no state, or no milestone result for its state.
    """
    from wise.evaluate import cached_probes, probe_records
    from wise.keyed.names import name_flags

    run, work_dir, n, own, result_path, result = _finished_run(qcfg, run_name, work)
    # the result's free-generation outcomes hold for its own routing (runs recorded before the rule: off)
    result_names = bool(result["settings"].get("keyed", {}).get("whole_names", False))

    def load(build, rekey: bool):
        editor = build()
        (editor.load_rekeyed if rekey else editor.load)(work_dir / "state")
        editor.prepare()
        if editor.n_edits != n:
            raise ConfigError(f"{work_dir}: state holds {editor.n_edits} edits, progress says {n}")
        return editor

    def probes(editor, on: bool, suffix: str = "") -> dict:
        flags = name_flags(editor.tokens.tokenizer) if on else None
        with editor.routed.names(flags):
            cache = work_dir / f"gate-probes-T{n}-{routing_tag(flags)}{suffix}"
            return cached_probes(
                editor.model, editor.routed, editor.tokens, own, cache=cache, generate=False, progress=True
            )

    editor = load(make_own or make, False)
    carrier = probes(editor, result_names)  # the run's own state routed as its result was
    check = max(
        abs(v - result["teacher_forced"][m]) for m, v in metrics_row(carrier, own)["teacher_forced"].items()
    )
    if qcfg.generate:
        _carry_free_outcomes(carrier, result, own, run_name)
    rekeyed = make_own is not None
    if rekeyed:
        del editor
        editor = load(make, True)
        posts = {names: probes(editor, names, "-rekeyed")}
        settings = [(names, None)]
    else:
        posts = {on: carrier if on == result_names else probes(editor, on) for on in (False, True)}
        settings = [(False, None), (True, None)]
    args = (editor.model, editor.routed, editor.tokens)
    need = pre_needed(posts.values(), carrier, gate)
    logger.info("pre-edit probes of %d of %d records", len(need), len(own))
    sub = (
        cached_probes(
            *args,
            [own[i] for i in need],
            cache=pre_probes_dir(work, run.dataset, qcfg.model),
            main_only=True,
            generate=qcfg.generate,
            progress=True,
        )
        if need
        else {"records": 0}
    )
    pre = pre_for(carrier, sub, need)
    measured = 0
    if qcfg.generate:
        for on, post in posts.items():
            if post is carrier:
                continue

            def measure(indices: list[int], on: bool = on) -> dict:
                with editor.routed.names(name_flags(editor.tokens.tokenizer) if on else None):
                    return probe_records(*args, [own[i] for i in indices], generate=True)

            measured += derive_free(post, carrier, pre, measure)
    settings += [(names, gate)] if gate is not None else []
    rows = [
        {
            "whole_names": on,
            "gate": g,
            "rekeyed": rekeyed,
            "metrics": metrics_row(gate_probes(posts[on], pre, g), own),
        }
        for on, g in settings
    ]
    if rekeyed:  # the run as it was keyed and routed, beside it
        own_row = {"whole_names": result_names, "gate": None, "rekeyed": False}
        rows.insert(0, {**own_row, "metrics": metrics_row(carrier, own)})
    out = {
        "T": len(own),
        "result": str(result_path),
        "rekeyed": rekeyed,
        "ungated_vs_result": check,
        "free_generation_measured": measured,
        "rows": rows,
    }
    # what the re-keyed state costs (the run's result gives its own state's cost)
    return {**out, **_state_cost(editor, gate, own)} if rekeyed else out


def gate_benchmark(qcfg: QualityConfig, spec: GateSpec, out: Path, command: str) -> dict[str, Any]:
    """Choose whole names and the gate on the development split, measure them on the ``apply`` runs; write
    ``out``."""
    from bench.quality import machine, make_editor
    from orchestrator.config import build_config
    from orchestrator.model_store import load_model

    job_cfg = build_config({"model": qcfg.model.model_dump()})

    def factory(method: str, where: str):
        settings, pool = keyed_method(qcfg, method, where)
        # the benchmark measures every gate from the ungated router (a method's own gate is one of them)
        settings = settings.model_copy(
            update={"keyed": settings.keyed.model_copy(update={"min_similarity": None})}
        )

        def make():
            model, tokenizer = load_model(job_cfg)
            return make_editor("wise", settings, model, tokenizer, pool)

        return settings, make

    settings, make = factory(spec.method, "gate.method")
    work = Path(qcfg.work)
    dev = develop(qcfg, spec, settings, make, work)
    result: dict[str, Any] = {"dev": dev, "test": {}, "command": command, "machine": machine()}
    write_json(out, result)
    runs = {r.name: r.method for r in qcfg.runs}
    for name in spec.apply:
        method = runs.get(name, spec.method)  # an unknown run: measure_run names it
        make_own = None if method == spec.method else factory(method, "gate.apply")[1]
        chosen = dev["names_chosen"], dev["chosen"]
        result["test"][name] = measure_run(qcfg, name, *chosen, make, work, make_own)
        write_json(out, result)
    return result


__all__ = [
    "GateSpec",
    "choose_gate",
    "derive_free",
    "gate_benchmark",
    "gate_probes",
    "load_gate_config",
    "pre_for",
    "pre_needed",
    "probe_slots",
    "refused",
    "routing_tag",
    "within",
]
