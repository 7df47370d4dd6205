"""The quality benchmark: milestones of one sequential run equal independent runs, runs resume without
recomputing, the shipped config is valid, and (real model) the smoke size runs end to end."""

import json
from pathlib import Path

import pytest
import torch

from bench.milestones import evaluate_deferred, milestone_path, sequential_run
from bench.quality import load_quality_config, method_settings, plan_run, planned_milestones
from orchestrator.config import ConfigError, load_config
from wise.config import WiseConfig
from wise.editor import WiseEditor
from wise.evaluate import evaluate_records
from wise.state import read_state

ROOT = Path(__file__).resolve().parents[2]


def _wise_cfg():
    return WiseConfig.model_validate(
        dict(
            layout="shards",
            layer=2,
            n_iter=6,
            templates={"count": 1, "length": 3},
            n_irrelevant=2,
            save_freq=2,
            merge_freq=2,
            retrieve=True,
            margins={"alpha": 0.5, "beta": 2.0, "gamma": 1.0, "scale": "auto"},
        )
    )


def _evaluate(editor, recs, cache):
    res = evaluate_records(
        editor.model, editor.routed, editor.tokens, recs, generate=False, cache=cache, chunk=2
    )
    return {"teacher_forced": res["teacher_forced"], "per_edit": res["per_edit"]}


class _Crash(RuntimeError):
    pass


def _runner(tiny_model, tiny_tokenizer, pool, calls, crash_at=None):
    import copy

    def make():
        calls.append("make")
        ed = WiseEditor(copy.deepcopy(tiny_model), tiny_tokenizer, _wise_cfg(), irrelevant=pool)
        apply = ed.apply

        def counted(recs):
            if crash_at is not None and ed.n_edits >= crash_at:
                raise _Crash("simulated crash")
            calls.append(len(recs))
            return apply(recs)

        ed.apply = counted
        return ed

    return make


def _run(make, edits, milestones, work, results, fingerprint=None, every=1, defer=False):
    return sequential_run(
        make,
        edits,
        milestones,
        work,
        results,
        fingerprint=fingerprint or {"test": 1},
        evaluate=_evaluate,
        checkpoint_every=every,
        defer=defer,
    )


def _states_equal(a: Path, b: Path) -> bool:
    (ta, ma), (tb, mb) = read_state(a), read_state(b)
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_milestones_equal_independent_runs_and_resume_never_recomputes(
    tiny_model, tiny_tokenizer, edits, pool, tmp_path
):
    w, r = tmp_path / "w", tmp_path / "r"
    # one sequential run with milestones 1 and 3, interrupted after its first 2 edits, then resumed
    calls: list = []
    with pytest.raises(_Crash):
        _run(_runner(tiny_model, tiny_tokenizer, pool, calls, crash_at=2), edits, [1, 3], w, r)
    assert milestone_path(r, 1).exists() and not milestone_path(r, 3).exists()
    calls.clear()
    done = _run(_runner(tiny_model, tiny_tokenizer, pool, calls), edits, [1, 3], w, r)
    assert done == [3] and calls == ["make", 1]  # resumed at 2 edits: only the third is applied
    assert not list(w.glob("eval-T*"))  # an evaluation's kept slices go once its result is written
    # independent runs of exactly 1 and exactly 3 edits
    for t in (1, 3):
        _run(
            _runner(tiny_model, tiny_tokenizer, pool, []),
            edits,
            [t],
            tmp_path / f"w{t}",
            tmp_path / f"r{t}",
            every=10,
        )
        seq = json.loads(milestone_path(r, t).read_text())
        alone = json.loads(milestone_path(tmp_path / f"r{t}", t).read_text())
        assert seq["per_edit"] == alone["per_edit"] and seq["teacher_forced"] == alone["teacher_forced"]
    assert _states_equal(w / "state", tmp_path / "w3" / "state")
    # T=3 ends inside a 2-edit shard: the partial shard holds the third edit and is routed, as in the job
    (_, meta) = read_state(tmp_path / "w3" / "state")
    assert meta["active"]["edit_ids"] == ["e2"]
    # everything finished: the same call loads no model and applies nothing
    calls.clear()
    assert _run(_runner(tiny_model, tiny_tokenizer, pool, calls), edits, [1, 3], w, r) == [] and calls == []
    # a state written with other settings is refused
    from orchestrator.config import ConfigError

    milestone_path(r, 3).unlink()
    # and a run another process holds is left alone
    import fcntl

    with open(w / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another process"):
            _run(_runner(tiny_model, tiny_tokenizer, pool, []), edits, [1, 3], w, r)
    with pytest.raises(ConfigError, match="other settings"):
        _run(_runner(tiny_model, tiny_tokenizer, pool, []), edits, [1, 3], w, r, fingerprint={"test": 2})


def test_deferred_milestones_are_kept_then_measured_as_the_inline_run_measures_them(
    tiny_model, tiny_tokenizer, edits, pool, tmp_path
):
    inline_w, inline_r, w, r = tmp_path / "iw", tmp_path / "ir", tmp_path / "w", tmp_path / "r"
    assert _run(_runner(tiny_model, tiny_tokenizer, pool, []), edits, [1, 3], inline_w, inline_r) == [1, 3]
    # editing with deferred evaluation: each milestone's state is kept, nothing is measured yet
    calls: list = []
    assert _run(_runner(tiny_model, tiny_tokenizer, pool, calls), edits, [1, 3], w, r, defer=True) == [1, 3]
    assert not r.exists() and sorted(p.name for p in w.glob("milestone-T*")) == [
        "milestone-T1",
        "milestone-T3",
    ]
    # a kept milestone counts as reached: running again, in either mode, edits nothing and loads no model
    calls.clear()
    assert _run(_runner(tiny_model, tiny_tokenizer, pool, calls), edits, [1, 3], w, r) == [] and calls == []
    # the evaluating side (another process in use): results as the inline run's, the copies deleted
    make = _runner(tiny_model, tiny_tokenizer, pool, calls)
    assert evaluate_deferred(make, edits, w, r, evaluate=_evaluate, extra={"x": 1}) == [1, 3]
    assert calls == ["make", "make"]  # one editor per kept state, and no edit applied
    for t in (1, 3):
        kept = json.loads(milestone_path(r, t).read_text())
        inline = json.loads(milestone_path(inline_r, t).read_text())
        assert kept["per_edit"] == inline["per_edit"] and kept["teacher_forced"] == inline["teacher_forced"]
        assert kept["T"] == t and kept["x"] == 1 and kept["seconds_per_edit"] > 0 and kept["eval_seconds"] > 0
        assert kept["edit_command"] is None  # the editing run's command (none given here)
    assert not list(w.glob("milestone-T*")) and evaluate_deferred(make, edits, w, r, evaluate=_evaluate) == []


def test_a_run_carried_to_a_fresh_work_directory_resumes_where_it_stopped(
    tiny_model, tiny_tokenizer, edits, pool, tmp_path
):
    import shutil

    from bench.carry import pack, unpack

    w, r, carry = tmp_path / "w", tmp_path / "r", tmp_path / "carry" / "run"
    with pytest.raises(_Crash):
        _run(_runner(tiny_model, tiny_tokenizer, pool, [], crash_at=2), edits, [1, 3], w, r, defer=True)
    assert pack(w, carry) == 2
    # one file per memory, the milestone copy kept for the deferred evaluation travels too, no lock file
    packed = {p.name: p.read_bytes() for p in (carry / "state").glob("*.safetensors")}
    assert {"active.safetensors", "merged.0.safetensors"} <= packed.keys()
    assert (carry / "milestone-T1" / "milestone.json").is_file() and not list(carry.rglob(".lock"))
    # a fresh machine: the work directory is gone; restoring rebuilds it and the run goes on from 2 edits
    shutil.rmtree(w)
    assert unpack(carry, w) == 2 and unpack(carry, w) is None  # never over a run in place
    calls: list = []
    assert _run(_runner(tiny_model, tiny_tokenizer, pool, calls), edits, [1, 3], w, r, defer=True) == [3]
    assert calls == ["make", 1]
    _run(
        _runner(tiny_model, tiny_tokenizer, pool, []), edits, [3], tmp_path / "w3", tmp_path / "r3", every=10
    )
    assert _states_equal(w / "state", tmp_path / "w3" / "state")
    # the restored milestone copy is measured by the deferred evaluation as any other
    assert evaluate_deferred(
        _runner(tiny_model, tiny_tokenizer, pool, []), edits, w, r, evaluate=_evaluate
    ) == [
        1,
        3,
    ]
    # packed again: the block that did not change is the same file byte for byte (stored once when committed)
    assert pack(w, carry) == 3
    again = {p.name: p.read_bytes() for p in (carry / "state").glob("*.safetensors")}
    assert again["merged.0.safetensors"] == packed["merged.0.safetensors"]
    assert again["active.safetensors"] != packed["active.safetensors"]
    # a state and progress that disagree (a checkpoint caught half-written) are refused, the carry kept
    progress = json.loads((w / "progress.json").read_text())
    (w / "progress.json").write_text(json.dumps({**progress, "applied": 2}))
    with pytest.raises(ConfigError, match="kept changing"):
        pack(w, carry, attempts=2)
    assert json.loads((carry / "carry.json").read_text())["edits"] == 3


def test_the_benchmark_restores_a_carried_run_before_resuming_it_and_packs_only_runs_it_holds(
    monkeypatch, tmp_path
):
    import bench.quality as quality

    cfg = load_quality_config(ROOT / "configs" / "bench" / "quality.yaml").model_copy(
        update={
            "work": str(tmp_path / "work"),
            "carry": str(tmp_path / "carry"),
            "output": str(tmp_path / "out"),
        }
    )
    run = "keyed-values/counterfact-long"
    work, carried = (
        tmp_path / "work" / "counterfact-long" / "keyed-values",
        tmp_path / "carry" / "counterfact-long" / "keyed-values",
    )
    calls: list = []
    monkeypatch.setattr(quality, "unpack", lambda c, w: calls.append(("unpack", c, w)))
    monkeypatch.setattr(quality, "pack", lambda w, c: calls.append(("pack", w, c)) or 7)
    monkeypatch.setattr(
        quality, "sequential_run", lambda make, recs, ms, w, *a, **k: calls.append(("run", w)) or []
    )
    monkeypatch.setattr(
        quality, "evaluate_deferred", lambda make, recs, w, *a, **k: calls.append(("eval", w)) or []
    )
    quality.quality_benchmark(cfg, only=[run])
    quality.quality_benchmark(cfg, only=[run], eval_deferred=True)
    assert calls == [("unpack", carried, work), ("run", work), ("unpack", carried, work), ("eval", work)]
    calls.clear()
    assert quality.quality_benchmark(cfg, only=[run], carry=True) == {} and calls == []  # nothing to pack
    work.mkdir(parents=True)
    (work / "progress.json").write_text("{}")
    assert quality.quality_benchmark(cfg, only=[run], carry=True) == {run: [7]}
    assert calls == [("pack", work, carried)]


def test_shipped_benchmark_config_is_valid():
    path = ROOT / "configs" / "bench" / "quality.yaml"
    assert path.read_text().startswith("# wisestream bench quality")
    cfg = load_quality_config(path)
    kinds = {m.kind for m in cfg.methods.values()}
    assert kinds == {"wise", "ft-l", "grace"}
    for spec in cfg.methods.values():
        method_settings(spec)
    for d in cfg.datasets.values():
        assert (ROOT / d.path).exists() and (not d.irrelevant or (ROOT / d.irrelevant["path"]).exists())
    assert all((ROOT / r.mix.path).exists() for r in cfg.runs if r.mix)
    runs = {r.name: r.max_t for r in cfg.runs}
    assert runs["keyed/zsre"] == runs["keyed/counterfact"] == runs["wise-retrieve/zsre"] == 1000
    assert runs["keyed/counterfact-long"] == runs["keyed-values/counterfact-long"] == 9000
    assert all(t >= 100 for t in runs.values()) and len(runs) == 12
    assert method_settings(cfg.methods["wise-merge"]).retrieve is False
    assert method_settings(cfg.methods["keyed"]).layout == "keyed"
    # keyed-values-residual is the default job's editor; keyed-values its edits as the recorded runs keyed and
    # routed them (the mean relation key, no gate); keyed the same with columns only
    job = load_config(ROOT / "configs" / "default.yaml").wise
    assert method_settings(cfg.methods["keyed-values-residual"]) == job and job.keyed.values
    assert job.keyed.relation_key == "residual" and job.keyed.min_similarity == 0.0
    recorded = job.keyed.model_copy(
        update={"relation_key": "mean", "relation_dim": 256, "min_similarity": None}
    )
    assert method_settings(cfg.methods["keyed-values"]).keyed == recorded
    assert method_settings(cfg.methods["keyed"]).keyed == recorded.model_copy(update={"values": False})
    smoke = load_quality_config(path, smoke=True)
    assert smoke.milestones == (1, 2) and all(r.max_t == 2 for r in smoke.runs)
    # the long run is left out of the smoke run
    assert {r.name for r in smoke.runs} == set(runs) - {
        "keyed/counterfact-long",
        "keyed-values/counterfact-long",
    }
    # editing with deferred evaluation and measuring the deferred milestones are separate invocations
    from bench.quality import quality_benchmark

    with pytest.raises(ConfigError, match="choose one of"):
        quality_benchmark(cfg, defer_eval=True, eval_deferred=True)
    # long runs are carried in a committed directory; the smoke run keeps to its own work directory
    assert cfg.carry == "benchmarks/carry" and smoke.carry is None
    with pytest.raises(ConfigError, match="carry: directory"):
        quality_benchmark(smoke, carry=True)


def test_a_dataset_shorter_than_a_milestone_ends_at_its_last_valid_edit(tmp_path):
    rec = {
        "src": "Q{i}?",
        "rephrase": "Q{i} again?",
        "alt": "A{i}",
        "loc": "nq question: L{i}",
        "loc_ans": "B",
    }
    records = [{k: v.format(i=i) for k, v in rec.items()} for i in range(4)]
    records[1]["alt"] = " "  # rejected by the stream: not an edit
    data = tmp_path / "edits.json"
    data.write_text(json.dumps(records))
    cfg = load_quality_config(ROOT / "configs" / "bench" / "quality.yaml").model_copy(
        update={"milestones": (1, 2, 10)}
    )
    cfg = cfg.model_copy(
        update={
            "datasets": {
                **cfg.datasets,
                "zsre": cfg.datasets["zsre"].model_copy(update={"path": str(data)}),
            }
        }
    )
    run = next(r for r in cfg.runs if r.name == "wise-merge/zsre")
    milestones, edits = plan_run(cfg, run)
    assert milestones == [1, 2, 3] and [e.target for e in edits] == ["A0", "A2", "A3"]
    assert plan_run(cfg, run, max_t=2)[0] == [1, 2]  # a cap within the dataset is kept as is
    # the shipped ZsRE file has two records with a blank target: its long run ends at its 998 valid edits
    shipped = planned_milestones(load_quality_config(ROOT / "configs" / "bench" / "quality.yaml"))
    assert shipped["wise-retrieve/zsre"] == shipped["keyed/zsre"] == [1, 10, 100, 998]
    assert shipped["keyed/counterfact"] == [1, 10, 100, 1000]
    assert (
        shipped["keyed/counterfact-long"]
        == shipped["keyed-values/counterfact-long"]
        == [1000, 2000, 5000, 9000]
    )
    long = {"wise-retrieve/zsre", "keyed/zsre", "keyed/counterfact", "keyed/counterfact-long"}
    long |= {"keyed-values/counterfact-long"}
    assert all(m == [1, 10, 100] for name, m in shipped.items() if name not in long)
    # a dataset without one valid edit is an error naming it, not an empty run
    data.write_text(json.dumps([{**records[1]}]))
    with pytest.raises(ConfigError, match="holds no valid edit"):
        plan_run(cfg, run)


SMOKE_METHODS = ("keyed", "wise-retrieve", "wise-merge", "ft-l", "grace")
ROUTED = ("keyed", "wise-retrieve", "wise-merge")  # methods with a side memory: a served forward is timed


def _smoke(out, datasets: tuple[str, ...], methods: tuple[str, ...], runs: list[str]) -> None:
    """``bench quality --smoke`` through the CLI: the pre-edit model alone first, then the runs, then the report;
    every (dataset, method) result at T = 2 beats the pre-edit model's reliability and reuses its probes."""
    from wisestream.cli import main

    only = ["--runs", ",".join(runs)] if runs else []
    # the pre-edit model alone first (what can run beside a long editing run): no edit, no method result
    assert main(["bench", "quality", "--smoke", "--pre-only", *only, "--out", str(out)]) == 0
    pre_files = sorted((out / "quality").glob("*/pre/T*.json"))
    assert [f"{p.parent.parent.name}/{p.name}" for p in pre_files] == [
        f"{d}/T{t}.json" for d in sorted(datasets) for t in (1, 2)
    ]
    assert not list((out / "quality").glob("*/wise-*")) and not list((out / "quality").glob("*/keyed"))
    # no editor state, only the pre-edit probes kept per slice of records (the runs' milestones reuse them)
    assert {p.name.rsplit("-", 1)[0] for p in (out / "work").glob("*/*")} == {"pre-probes"}
    assert len(list((out / "work").glob("*/pre-probes-*/*.json"))) == 2 * len(datasets)  # T=1 and T=2
    pre_text = {p: p.read_text() for p in pre_files}
    assert all("--pre-only" in json.loads(t)["command"] for t in pre_text.values())
    assert main(["bench", "quality", "--smoke", *only, "--out", str(out)]) == 0
    assert {p: p.read_text() for p in pre_files} == pre_text  # the runs read them, never measure them again
    report = (out / "REPORT.md").read_text()
    for dataset in datasets:
        assert (out / f"retention_{dataset}.png").stat().st_size > 10_000
        for method in methods:
            assert f"| {method} | 2 |" in report
            r = json.loads((out / "quality" / dataset / method / "T2.json").read_text())
            assert r["T"] == 2 and r["command"].startswith("wisestream bench quality --smoke")
            tf, pre = r["teacher_forced"], r["pre"]["teacher_forced"]
            assert (
                pre
                == json.loads((out / "quality" / dataset / "pre" / "T2.json").read_text())["teacher_forced"]
            )
            assert tf["reliability"] > pre["reliability"], (dataset, method, tf, pre)
            assert 0.0 <= tf["locality"] <= 1.0 and r["seconds_per_edit"] > 0
            # the locality probes asking a fact the stream edits, split out (none among two records)
            locs, split = [e["locality"] for e in r["per_edit"]], r["conflicts"]
            assert split["probes"] == split["edited_facts"] == 0
            assert split["locality_unedited_facts"] == pytest.approx(sum(locs) / len(locs))
            if method in ROUTED:
                serving = r["serving"]
                assert serving["prefill_main_seconds"] > 0 and serving["decode_main_seconds"] > 0
                assert serving["prefill"] > -1.0 and serving["repeats"] == 5
    assert "## Serving" in report and "## Speed" in report


@pytest.mark.model
def test_smoke_of_the_default_layout_runs_end_to_end(tmp_path):
    _smoke(tmp_path / "results", ("counterfact",), ("keyed",), ["keyed/counterfact"])
    # only the selected run: no other method's result
    assert [p.name for p in (tmp_path / "results" / "quality").glob("*/*") if p.name != "pre"] == ["keyed"]


@pytest.mark.model
@pytest.mark.slow
def test_smoke_benchmark_runs_every_method_end_to_end(tmp_path):
    _smoke(tmp_path / "results", ("counterfact", "zsre"), SMOKE_METHODS, [])


def test_a_run_resumes_when_only_routing_settings_differ():
    from bench.milestones import state_part

    keyed = {"columns": 64, "min_similarity": None}
    old = {"settings": {"layout": "keyed", "keyed": keyed}, "records": ["a"]}
    new = {
        "settings": {"layout": "keyed", "keyed": {**keyed, "whole_names": True, "min_similarity": 0.2}},
        "records": ["a"],
    }
    assert state_part(old) == state_part(new) and old["settings"]["keyed"] == keyed  # inputs untouched
    other = {**new, "settings": {**new["settings"], "keyed": {**new["settings"]["keyed"], "columns": 32}}}
    assert state_part(old) != state_part(other)
    assert state_part({"settings": {"alpha": 1}}) == {"settings": {"alpha": 1}}  # no keyed settings
