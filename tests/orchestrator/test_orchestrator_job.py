"""The job end to end on a tiny random Llama saved as a real checkpoint: CLI, report, dead letters, Python
ingestion. The real embedded model is exercised in tests/integration."""

import json

import pytest

from orchestrator.config import build_config
from orchestrator.job import EditJob, JobError, run_job
from streams import read_dead_letters
from wisestream.cli import main

REPORT_KEYS = {
    "edits_seen",
    "edits_applied",
    "dead_lettered",
    "retention",
    "retention_generate",
    "pre",
    "seconds_per_edit",
    "wall_seconds",
    "config",
}


def _edit_lines(edits):
    return [
        json.dumps(
            {
                "id": e.id,
                "prompt": e.prompt,
                "target": e.target,
                "rephrase": list(e.rephrase),
                "locality_prompt": e.locality_prompt,
                "locality_answer": e.locality_answer,
            }
        )
        for e in edits
    ]


def _overrides(tmp_path, model_dir, layout="keyed"):
    common = [
        f"model.name={model_dir}",
        "wise.layer=2",
        "wise.templates.count=1",
        "wise.templates.length=2",
        "wise.save_freq=2",
        "wise.merge_freq=2",
        f"output.dir={tmp_path / 'out'}",
    ]
    if layout == "keyed":
        return [*common, "wise.keyed.n_iter=5", "wise.keyed.columns=8", "wise.keyed.block_edits=4"]
    return [
        *common,
        "wise.layout=shards",
        "wise.n_iter=5",
        "wise.n_irrelevant=1",
        "wise.margins.scale=auto",
        "wise.margins.alpha=0.5",
        "wise.margins.beta=2",
        "wise.margins.gamma=1",
    ]


@pytest.mark.parametrize("layout", ["keyed", "shards"])
def test_cli_run_writes_report_state_and_dead_letters(ray_local, tmp_path, model_dir, edits, capsys, layout):
    data = tmp_path / "edits.jsonl"
    lines = _edit_lines(edits[:3])
    lines.insert(1, '{"id": "bad1", "prompt": "no target here"}')
    lines.insert(3, "this is not json")
    lines.append(json.dumps({"id": "long", "prompt": "word " * 300, "target": "x"}))
    lines.append(_edit_lines(edits[:1])[0])  # same id again
    data.write_text("\n".join(lines) + "\n")
    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(_edit_lines(edits[3:])) + "\n")
    config = tmp_path / "job.yaml"
    config.write_text(f"stream:\n  path: {data}\n  format: jsonl\nirrelevant:\n  path: {pool}\n")
    report_path = tmp_path / "r.json"
    args = ["run", str(config), "--report", str(report_path), "--set", "wise.max_prompt_tokens=64"]
    for o in _overrides(tmp_path, model_dir, layout):
        args += ["--set", o]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Retention after 3 sequential edits" in out and str(report_path) in out
    report = json.loads(report_path.read_text())
    assert report.keys() >= REPORT_KEYS
    assert report["edits_seen"] == 7 and report["edits_applied"] == 3 and report["dead_lettered"] == 3
    # an id seen again is not an error: it is already applied (a redelivery), so it is skipped and counted
    assert report["duplicates_skipped"] == 1 and report["duplicates_applied"] == 0
    assert report["retention"].keys() == {"reliability", "generalization", "locality"}
    assert report["retention_generate"].keys() == {"reliability", "generalization"}
    assert report["config"]["wise"]["layer"] == 2
    # router diagnostics: an edit prompt's best routing score over its memory's threshold. A threshold is act_ratio
    # x the lowest score among its memory's own edits (their keys kept in float16: 1% slack), so every edit prompt
    # scores at least 1 / act_ratio (1.14) times it, and every edit routes to a side memory
    # (keyed: an edit prompt holds its own subject, so it always routes; the ratio is 1 + relation similarity,
    # which is 2 for the edit's own prompt up to float16 keys)
    floor = 0.99 / report["config"]["wise"]["act_ratio"] if layout == "shards" else 1.99
    assert report["score_over_threshold"]["edit"]["min"] >= floor
    assert report["routed_fraction"]["edit"] == 1.0
    assert [e["id"] for e in report["per_edit"]] == ["e0", "e1", "e2"]
    dead = read_dead_letters(tmp_path / "out" / "dead_letter.jsonl")
    reasons = " | ".join(d.reason for d in dead)
    assert len(dead) == 3
    assert "target" in reasons and "not valid JSON" in reasons and "max_prompt_tokens" in reasons
    assert (tmp_path / "out" / "state" / "wise_state.safetensors").is_file()


def test_python_iterable_ingestion(ray_local, tmp_path, model_dir, edits):
    def from_my_system():
        for e in edits[:2]:
            yield {"id": e.id, "prompt": e.prompt, "target": e.target}

    pool = tmp_path / "pool.jsonl"
    pool.write_text("\n".join(_edit_lines(edits[3:])) + "\n")
    cfg = build_config(
        {}, [*_overrides(tmp_path, model_dir), "eval.generate=false", f"irrelevant.path={pool}"]
    )
    report = run_job(cfg, records=from_my_system())
    assert report["edits_applied"] == 2 and report["retention_generate"] is None
    assert report["retention"]["locality"] is None  # no locality probes given: not measured, not faked


def test_cli_reports_config_errors_cleanly(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("wise:\n  merge_freq: 7\n  save_freq: 2\n")
    assert main(["run", str(config)]) == 2
    assert "wise: merge_freq (7) must be a multiple of save_freq (2)" in capsys.readouterr().err


def test_auto_margins_without_pool_fail_at_setup(ray_local, tmp_path, model_dir, edits):
    cfg = build_config({}, _overrides(tmp_path, model_dir, "shards"))
    with pytest.raises(JobError, match="needs an irrelevant pool"):
        run_job(cfg, records=iter(_edit_lines(edits[:1])))


def test_job_needs_edits(tmp_path):
    with pytest.raises(JobError, match="stream.path"):
        EditJob(build_config({}, [f"output.dir={tmp_path}"]))


def test_speed_benchmark_and_layer_scan_on_tiny_model(tmp_path, model_dir, edits, capsys):
    data = tmp_path / "edits.jsonl"
    data.write_text("\n".join(_edit_lines(edits)) + "\n")
    config = tmp_path / "job.yaml"
    config.write_text(f"stream:\n  path: {data}\n  format: jsonl\nirrelevant:\n  path: {data}\n")
    args = []
    for o in _overrides(tmp_path, model_dir, "shards"):
        args += ["--set", o]
    assert main(["bench", "speed", "--edits", "2", "--config", str(config), *args]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(result)[:4] == ["seconds_per_edit_engine", "seconds_per_edit_naive", "ratio", "metrics_equal"]
    assert result["edits"] == 2 and result["metrics_equal"] is True
    assert result["steps_engine"] == result["steps_naive"]
    assert result["ratio"] > 0
    assert (
        main(
            ["bench", "layers", "--records", "4", "--config", str(config), "--set", f"model.name={model_dir}"]
        )
        == 0
    )
    scan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(scan["mean"]) == len(scan["last"]) == 4 and all(0 <= x <= 1 for x in scan["mean"])
