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
    assert "| 11.70 | 102.80 | **8.79** | True | `wisestream bench speed --edits 3` |" in report
    assert "| 2 x 1 | 0.105 | 9.6 | 1.59 | 1.0e-04 | `wisestream bench shards` |" in report
    assert "Command: `wisestream bench serving --checkpoint runs/x`" in report
    for row in (
        "| served tokens/s, routed (32 requests) | 84.9 |",
        "| tokens/s ratio routed / main only | 0.89 |",
        "| publish latency, one new memory (1.00 MiB) | 109 ms |",
    ):
        assert row in report
    assert "Not measured" not in report and "not measured" not in report


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
