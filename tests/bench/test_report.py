"""The benchmark report renders the speed, layout and serving records that the ``--out`` options write, each
number with the command that produced it, and says what has not been measured."""

import argparse
import json

from bench.report import render_report
from wisestream.cli import _save_result


def _save(path, argv, result):
    _save_result(argparse.Namespace(out=str(path), argv=argv), result)


def test_report_quotes_each_benchmark_record_with_its_command(tmp_path):
    _save(
        tmp_path / "speed.json",
        ["bench", "speed", "--edits", "3"],
        {
            "seconds_per_edit_engine": 11.7,
            "seconds_per_edit_naive": 102.8,
            "ratio": 8.786,
            "n_iter": 70,
            "edits": 3,
            "metrics_equal": True,
            "metrics_engine": {
                "teacher_forced": {"reliability": 1.0, "generalization": 0.0, "locality": 1.0}
            },
            "max_abs_delta_diff": 1.8e-4,
        },
    )
    _save(
        tmp_path / "shards.json",
        ["bench", "shards"],
        {
            "edits": 8,
            "speedup_2x1": 1.59,
            "max_state_diff": {"2x1": 1e-4},
            "layouts": {
                "1x1": {
                    "editors": 1,
                    "shards_per_editor": 1,
                    "edits_per_second": 0.066,
                    "seconds_per_edit": 15.2,
                },
                "2x1": {
                    "editors": 2,
                    "shards_per_editor": 1,
                    "edits_per_second": 0.105,
                    "seconds_per_edit": 9.6,
                },
            },
        },
    )
    _save(
        tmp_path / "serving.json",
        ["bench", "serving", "--checkpoint", "runs/x"],
        {
            "source": "runs/x",
            "model": "m",
            "replicas": 2,
            "memories": 10,
            "edits": 20,
            "throughput": {"routed": {"requests": 32, "tokens_per_second": 84.94}},
            "routing_tokens_per_second_ratio": 0.889,
            "publish": {"one_new_memory": {"bytes": 2**20, "seconds": 0.109}},
        },
    )
    report = render_report(tmp_path).read_text()
    assert (
        "| 11.70 | 102.80 | **8.79** | True | 1.000 / 0.000 / 1.000 (all 0 or 1) | 1.8e-04 | "
        "`wisestream bench speed --edits 3` |"
    ) in report
    assert "| 2 x 1 | 0.105 | 9.6 | 1.59 | 1.0e-04 | `wisestream bench shards` |" in report
    assert "Command: `wisestream bench serving --checkpoint runs/x`" in report
    for row in (
        "| served tokens/s, routed (32 requests) | 84.9 |",
        "| tokens/s ratio routed / main only | 0.89 |",
        "| publish latency, one new memory (1.00 MiB) | 109 ms |",
    ):
        assert row in report
    speed = report[
        report.index("### The cached engine at equal settings") :
    ]  # scale.json, absent here, has its own section
    assert "Not measured" not in speed and "not measured" not in speed


def test_report_tabulates_each_merge_trace_with_its_command(tmp_path):
    def shard(i, unrelated, own):
        return {"shard": i, "added_norm": 20.0, "unrelated": unrelated, "own_edits": own}

    merges = [
        {
            "edits": 4,
            "base": {"norm": 0.0, "unrelated": 0.0},
            "shards": [shard(0, 16.0, 36.0), shard(1, 18.0, 34.0)],
            "merged": {
                "norm": 40.7,
                "threshold": 41.1,
                "edits_min": 46.7,
                "edits_mean": 52.0,
                "unrelated": 35.46,
                "unrelated_routed": 0.0,
            },
        }
    ]
    _save(
        tmp_path / "merges_zsre.json",
        ["bench", "merges", "--edits", "4"],
        {
            "run": "wise-merge/zsre",
            "edits": 4,
            "probes": 60,
            "settings": {"save_freq": 2, "merge_freq": 4},
            "merges": merges,
        },
    )
    report = render_report(tmp_path).read_text()
    assert "## WISE-Merge: routing at each merge" in report
    assert (
        "`wisestream bench merges --edits 4` (wise-merge/zsre, 4 edits, 2-edit shards merged every 4"
        in report
    )
    assert "| 4 | 0.0 / 0.0 | 17.0 / 35.0 | 40.7 | 35.5 | 46.7 | 41.1 | 0.00 | – |" in report
    merges[0]["centred"] = {"threshold": 30.0, "edits_min": 34.1, "unrelated": 6.25, "unrelated_routed": 0.0}
    _save(
        tmp_path / "merges_zsre.json",
        ["bench", "merges"],
        {**json.loads((tmp_path / "merges_zsre.json").read_text())["result"], "merges": merges},
    )
    report = render_report(tmp_path).read_text()
    assert "| 4 | 0.0 / 0.0 | 17.0 / 35.0 | 40.7 | 35.5 | 46.7 | 41.1 | 0.00 | 6.2 / 34.1 / 0.00 |" in report
    assert report.index("## WISE-Merge") < report.index("## Speed")


def test_report_says_what_is_not_measured(tmp_path):
    report = render_report(tmp_path).read_text()
    assert "## WISE-Merge" not in report  # no trace, no section
    assert "Not measured yet: run `wisestream bench speed" in report
    assert "Edits/s per layout not measured yet" in report
    assert "**Not measured yet.** Serving tokens/s" in report


def _quality(root, dataset, method, t, **extra):
    path = root / "quality" / dataset / method / f"T{t}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "T": t,
        "teacher_forced": {"reliability": 0.99, "generalization": 0.981, "locality": 1.0},
        "generate": {"reliability": 0.9, "generalization": 0.8},
        "seconds_per_edit": 4.5,
        "command": f"wisestream bench quality --runs {method}/{dataset}",
        **extra,
    }
    path.write_text(json.dumps(result))


MEMORY = {
    "memories": 3,
    "routing": 872628,
    "bytes": 11489460,
    "percent_of_model": 2.1353490905639316,
    "bytes_per_edit": 107378.1308411215,
    "layout": "keyed",
}
MIX = {
    "name": "nearmiss",
    "edits": 7,
    "pre": {
        "teacher_forced": {"reliability": 0.1667, "generalization": 0.119, "locality": 1.0},
        "generate": {"reliability": 0.0, "generalization": 0.0},
    },
    "teacher_forced": {"reliability": 1.0, "generalization": 0.6667, "locality": 0.75},
    "generate": {"reliability": 1.0, "generalization": 0.4286},
    "routed_fraction": {"edit": 1.0, "rephrase": 1.0, "locality": 0.25},
}


def test_quality_tables_put_the_memory_cost_beside_retention(tmp_path):
    _quality(tmp_path, "zsre", "keyed", 100, memory=MEMORY, mix=MIX)
    _quality(tmp_path, "zsre", "keyed", 1, memory=MEMORY, mix={"name": "nearmiss", "edits": 0, "pre": {}})
    _quality(tmp_path, "zsre", "wise-retrieve", 100)  # an older result: no memory block, nothing inferred
    report = render_report(tmp_path).read_text()
    cmd = "`wisestream bench quality --runs keyed/zsre`"
    # keyed first, its cost beside its retention: 107378 B/edit = 105 KiB, 2.14% of the model
    assert (
        f"| keyed | 100 | 0.990 | 0.981 | 1.000 | 0.900 | 0.800 | 0.981 | 105 KiB | 2.14 | 4.50 | {cmd} |"
        in report
    )
    assert "| wise-retrieve | 100 | 0.990 | 0.981 | 1.000 | 0.900 | 0.800 | 0.981 | – | – | 4.50 |" in report
    assert report.index("| keyed | 100 |") < report.index("| wise-retrieve | 100 |")
    # the headline carries the same cost columns
    assert "| zsre | 100 | keyed | 0.990 | 0.981 | 1.000 | 0.900 | 0.800 | 105 KiB | 2.14 | 4.50 |" in report
    assert "| zsre | 100 | wise-retrieve | 0.990 | 0.981 | 1.000 | 0.900 | 0.800 | – | – | 4.50 |" in report
    # the near-miss edits, measured on their own
    assert (
        "| keyed | 100 | nearmiss | 7 | 1.000 | 0.667 | 0.750 | 1.000 | 0.429 | 1.00 / 1.00 / 0.25 | "
        "0.167 / 0.119 / 1.000 |"
    ) in report
    assert report.count("| nearmiss |") == 1  # only the result with a mix block


def test_each_milestone_with_a_timed_state_gets_its_cost_row(tmp_path):
    serving = {
        "prefill": 0.04,
        "decode": 0.1,
        "prefill_seconds": 0.052,
        "prefill_main_seconds": 0.05,
        "decode_seconds": 0.011,
        "decode_main_seconds": 0.01,
        "repeats": 5,
    }
    for t, loc in ((1000, 0.97), (2000, 0.955)):
        # the later milestone keeps the locality of the probes asking no edited fact
        split = {"conflicts": {"locality_unedited_facts": 0.9812, "edited_facts": 100}} if t == 2000 else {}
        _quality(
            tmp_path,
            "counterfact-long",
            "keyed",
            t,
            memory=MEMORY,
            serving=serving,
            eval_seconds=1234.5,
            teacher_forced={"reliability": 0.97, "generalization": 0.4, "locality": loc},
            **split,
        )
    _quality(tmp_path, "zsre", "keyed", 100, memory=MEMORY)  # no serving block: no cost table
    report = render_report(tmp_path).read_text()
    # mean of 0.97, 0.4, 0.97 = 0.78; 1.04x the main-only prefill (52.0 / 50.0 ms), 1.10x decode
    assert (
        "| keyed | 1000 | 0.780 | 0.970 | – | – | 105 KiB | 2.14 | 1.04x (52.0 / 50.0 ms) | 1.10x (11.0 / 10.0 ms) | "
        "4.50 | 1234 |"
    ) in report
    # ceiling: 0.955 + (1 - 0.9812) x 1,900 / 2,000 probes (one per edit) = 0.97286
    assert "| keyed | 2000 | 0.775 | 0.955 | 0.981 | 0.973 | 105 KiB |" in report
    assert report.count("Cost at each milestone") == 1
    assert (
        report.index("### counterfact-long")
        < report.index("Cost at each milestone")
        < report.index("### zsre")
    )


def _edits(rel: list[float], gen: float = 0.5) -> list[dict]:
    return [
        {"id": f"e{i}", "reliability": r, "generalization": gen, "locality": 1.0} for i, r in enumerate(rel)
    ]


def test_retention_by_age_separates_old_edits_from_recent_ones(tmp_path):
    # T=10: all ten edits took; T=20: five of the first ten were forgotten, the ten recent ones hold
    _quality(tmp_path, "cf", "keyed", 1, per_edit=_edits([1.0]))  # under 10 edits: left out
    _quality(tmp_path, "cf", "keyed", 10, per_edit=_edits([1.0] * 10))
    _quality(tmp_path, "cf", "keyed", 20, per_edit=_edits([1.0, 0.0] * 5 + [1.0] * 10, gen=0.25))
    _quality(tmp_path, "cf", "grace", 20, per_edit=_edits([1.0] * 20))  # one milestone: no row
    _quality(tmp_path, "zsre", "keyed", 20, per_edit=_edits([1.0] * 20))  # one milestone: no table
    report = render_report(tmp_path).read_text()
    assert "| method | T | edits 0-9 | edits 10-19 |" in report
    assert "| keyed | 10 | 1.00 / 0.500 / 1.00 | – |" in report
    assert "| keyed | 20 | 0.500 / 0.250 / 1.00 | 1.00 / 0.250 / 1.00 |" in report
    assert "| grace | 20 |" not in report.split("Retention by the age")[1]
    assert report.count("Retention by the age") == 1


def test_report_renders_cost_at_scale_from_scale_json(tmp_path):
    def row(layout, t, nbytes, overhead, retention=None):
        return {
            "layout": layout,
            "T": t,
            "bytes": nbytes,
            "percent_of_model": 100.0 * nbytes / 538_000_000,
            "bytes_per_edit": nbytes / t,
            "overhead": overhead,
            "retention": retention,
        }

    timed = {
        "prefill": 0.05,
        "decode": 0.2,
        "prefill_seconds": 0.105,
        "decode_seconds": 0.012,
        "prefill_main_seconds": 0.1,
        "decode_main_seconds": 0.01,
    }
    retention = {"zsre": {"T": 998, "reliability": 0.964, "generalization": 0.79, "locality": 0.993}}
    _save(
        tmp_path / "scale.json",
        ["bench", "scale", "--ts", "100,1000"],
        {
            "model_bytes": 538_000_000,
            "prefill": {"sequences": 8, "tokens": 32},
            "decode": {"sequences": 32},
            "repeats": 5,
            "threads": 1,
            "rows": [
                row("shards", 1000, 1_769_472_000, None, retention),
                row("keyed", 1000, 5_107_616, timed),
                row("keyed", 100, 4_405_648, timed),
            ],
        },
    )
    report = render_report(tmp_path).read_text()
    assert "## Cost at scale" in report and "Command: `wisestream bench scale --ts 100,1000`." in report
    assert (
        "| keyed | 100 | 4.20 MiB | 0.819 | 43.0 KiB | 1.05x (105.0 / 100.0 ms) | 1.20x (12.0 / 10.0 ms) | – |"
        in report
    )
    assert "| keyed | 1000 | 4.87 MiB | 0.949 | 4.99 KiB |" in report
    assert (
        "| shards | 1000 | 1.65 GiB | 329 | 1.69 MiB | not timed | not timed | zsre T998: 0.96 / 0.79 / 0.99 |"
        in report
    )
    assert report.index("| keyed | 100 |") < report.index("| keyed | 1000 |") < report.index("| shards |")
    assert "![cost vs edits](cost_vs_edits.png)" in report
    assert (tmp_path / "cost_vs_edits.png").stat().st_size > 0
    # a further T measured by its own command is tabulated below, with that command
    _save(
        tmp_path / "scale_100k.json",
        ["bench", "scale", "--ts", "100000"],
        {
            "model_bytes": 538_000_000,
            "repeats": 5,
            "threads": 2,
            "rows": [row("keyed", 100_000, 255_735_936, timed)],
        },
    )
    report = render_report(tmp_path).read_text()
    assert (
        "Further rows: `wisestream bench scale --ts 100000` (median of 5 pairs, 2 torch thread(s)" in report
    )
    assert "| keyed | 100000 |" in report


def test_report_says_when_scale_is_not_measured(tmp_path):
    report = render_report(tmp_path).read_text()
    assert "## Cost at scale\n\n**Not measured yet.** Memory and routing overhead" in report
    assert not (tmp_path / "cost_vs_edits.png").exists()


def test_report_renders_the_stage_profile_and_the_job_against_its_engine(tmp_path):
    stages = {"frozen_prefix": 0.5, "upper_forward": 1.2, "backward": 1.1, "other": 0.2, "checkpoint": 0.01}
    _save(
        tmp_path / "profile.json",
        ["bench", "profile", "--edits", "40"],
        {
            "edits": 40,
            "threads": 2,
            "config": {"shards_per_editor": 4},
            "engine": {"edits_per_second": 1 / 3.0, "steps_per_edit": 10.2, "stages": stages},
            "jobs": {"eval_off": {"edits_per_second": 0.3, "ratio_to_engine": 0.9, "evaluations": 0}},
            "levers": {"early stop off": {"seconds_per_edit": 8.1, "steps_per_edit": 30.0, "gain": 2.7}},
        },
    )
    report = render_report(tmp_path).read_text()
    assert "| frozen prefix (layers below the edit, once per edit) | 0.500 | 16.7% |" in report
    assert "| checkpoint write (job only) | 0.010 |  |" in report  # outside the engine's total
    assert "| **engine total** | **3.000** | 100% |" in report
    assert "| eval off | 3.33 | 0.300 | 0.90 | 0 |" in report
    assert "| early stop off | 8.10 | 30.0 | 2.70x |" in report
    assert "Command: `wisestream bench profile --edits 40`" in report
    assert "Editors compared not measured yet" in report
