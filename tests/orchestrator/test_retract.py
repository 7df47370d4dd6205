"""Edits that change through the job on the tiny model: supersede (a later edit of the same prompt), retraction
records in the stream (order, dead letters, metrics, kill -9 exactly once) and ``wisestream retract``."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from helpers import n_iter

from orchestrator.job import EditJob, run_job
from streams import parse_record
from wise.evaluate import evaluate_records
from wise.factory import make_editor
from wise.state import read_state


def _cfg(config: Path, out: Path, *extra: str):
    from orchestrator.config import load_config

    return load_config(config, [f"output.dir={out}", *extra])


def _edits(config: Path) -> list[dict]:
    return [json.loads(line) for line in (config.parent / "edits.jsonl").read_text().splitlines()]


def _ids(meta: dict) -> list[str]:
    return [i for m in [*meta["merged"], *meta["pending"], meta["active"]] for i in m["edit_ids"]]


def _routed(config: Path, out: Path, model_dir: Path, tokenizer, records: list[dict]) -> list[bool]:
    """Whether each record's prompt routes to a side memory of the job's final state (False: main memory)."""
    from transformers import AutoModelForCausalLM

    ed = make_editor(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, _cfg(config, out).wise)
    ed.load_state_dict(*read_state(out / "state"))
    res = evaluate_records(ed.model, ed.routed, ed.tokens, [parse_record(r) for r in records], generate=False)
    return [e["routed"] for e in res["per_edit"]]


def _metric(job: EditJob, name: str) -> float | None:
    assert job.metrics is not None
    return job.metrics.registry.get_sample_value(name, job.metrics.labels)


def test_a_later_edit_of_the_same_prompt_supersedes_the_earlier_one(
    ray_local, job_files, tmp_path, model_dir, tiny_tokenizer
):
    e = _edits(job_files)
    facts_a = [{**x, "id": f"a{i}"} for i, x in enumerate(e[20:23])]
    facts_b = [
        {**x, "id": f"b{i}", "target": "guitar" if x["target"] != "guitar" else "piano"}
        for i, x in enumerate(e[20:23])
    ]
    records = [*facts_a, *e[:10], *facts_b]  # 16 edits: 4 stored shards, 2 merges
    out = tmp_path / "supersede"
    job = EditJob(_cfg(job_files, out), records=records)
    try:
        job.setup()
        report = job.run()
        assert _metric(job, "wisestream_edits_superseded_total") == 3
        assert _metric(job, "wisestream_edits_retracted_total") == 0
    finally:
        job.cleanup()
    assert report["edits_superseded"] == 3 and report["edits_lost"] == 0 and report["edits_applied"] == 13
    _, meta = read_state(out / "state")
    assert not {"a0", "a1", "a2"} & set(_ids(meta)) and meta["superseded"] == ["a0", "a1", "a2"]
    # the same prompts route to B's memory (B's keys are live), the unrelated edits still route
    assert _routed(job_files, out, model_dir, tiny_tokenizer, [*facts_b, *e[:10]]) == [True] * 13


def test_a_retraction_in_the_file_stream_removes_the_edit_after_the_edits_before_it(
    ray_local, job_files, tmp_path, model_dir, tiny_tokenizer
):
    e = _edits(job_files)[:16]
    # u7's and u9's subjects are in no other edit: once retracted, their prompts have nothing to route to
    lines = [
        *e[:8],
        {"op": "retract", "id": "u7"},  # waits until shards 0 and 1 are stored
        {"op": "retract", "id": "nope"},  # never applied: dead letter
        *e[8:12],
        {"op": "retract", "id": "u9"},  # u9 is accepted, not trained yet: waits for its shard
        {"op": "retract", "id": "u7"},  # already retracted (or waiting to be): dead letter
        {"op": "remove", "id": "u3"},  # unknown op: rejected, naming the field
        *e[12:],
    ]
    data = tmp_path / "with-retractions.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "retract"
    job = EditJob(_cfg(job_files, out, f"stream.path={data}"))
    try:
        job.setup()
        report = job.run()
        assert _metric(job, "wisestream_edits_retracted_total") == 2
    finally:
        job.cleanup()
    assert report["edits_retracted"] == 2 and report["retractions_pending"] == []
    assert report["edits_applied"] == 14 and report["edits_lost"] == 0 and report["dead_lettered"] == 3
    _, meta = read_state(out / "state")
    assert meta["retracted"] == ["u7", "u9"] and not {"u7", "u9"} & set(_ids(meta))
    # the retracted prompts route to the main memory again; the others keep their side memory
    routed = _routed(job_files, out, model_dir, tiny_tokenizer, e)
    assert [i for i, r in enumerate(routed) if not r] == [7, 9]
    dead = [json.loads(x) for x in (out / "dead_letter.jsonl").read_text().splitlines()]
    reasons = [d["reason"] for d in dead]
    assert "retract: edit 'nope' was never applied" in reasons
    assert "retract: edit 'u7' is already retracted" in reasons
    assert "op: must be 'edit' or 'retract', got 'remove'" in reasons


def test_cli_retract_rewrites_the_checkpoint_and_refuses_unknown_ids(ray_local, job_files, tmp_path, capsys):
    from wisestream.cli import main

    out = tmp_path / "cli"
    first = run_job(_cfg(job_files, out, "max_edits=16"))
    assert first["edits_retracted"] == 0
    ckpt = out / "checkpoint"
    before = (ckpt / "checkpoint.json").read_bytes()
    capsys.readouterr()  # the job's own output
    assert main(["retract", "--checkpoint", str(ckpt), "--id", "u3", "--id", "nope", "--id", "zz"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: not in the checkpoint's stored edits (unknown or already removed): ['nope', 'zz']"]
    assert (ckpt / "checkpoint.json").read_bytes() == before  # nothing written
    assert main(["retract", "--checkpoint", str(ckpt), "--id", "u3", "--id", "u5"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("retracted 2 edit(s) (u3, u5); 14 left in")
    committed = json.loads((ckpt / "checkpoint.json").read_text())
    assert committed["bank"]["retracted"] == ["u3", "u5"]
    # the same command again resumes from the new checkpoint: the edits stay out of the state
    again = run_job(_cfg(job_files, out, "max_edits=16"))
    assert again["edits_retracted"] == 2 and again["edits_applied"] == 14 and again["edits_lost"] == 0
    assert main(["retract", "--checkpoint", str(ckpt), "--id", "u3"]) == 1  # already retracted
    assert "['u3']" in capsys.readouterr().err


SLOW = [n_iter(40), "max_edits=20", "checkpoint.every=1"]


def test_kill_9_after_a_retraction_is_committed_neither_repeats_nor_loses_it(job_files, tmp_path, jobproc):
    e = _edits(job_files)[:20]
    data = tmp_path / "slow-retract.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in [*e[:8], {"op": "retract", "id": "u1"}, *e[8:]]))
    out = tmp_path / "killed"
    args = (*SLOW, f"stream.path={data}")
    proc = jobproc.start(job_files, out, *args)
    # kill once the retraction is committed and more edits are still to come
    jobproc.wait_for(
        lambda: (
            jobproc.committed(out).get("bank", {}).get("retracted") == ["u1"]
            and jobproc.committed(out).get("next_store", 0) < 5
        ),
        proc,
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = jobproc.start(job_files, out, *args)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from"]["edits_applied"] > 0
    # applied once: not re-read (a second application would be dead-lettered as "already retracted")
    assert report["edits_retracted"] == 1 and report["dead_lettered"] == 0
    assert report["edits_applied"] == 19 and report["duplicates_applied"] == 0 and report["edits_lost"] == 0
    _, meta = read_state(out / "state")
    assert meta["retracted"] == ["u1"] and "u1" not in _ids(meta)
    assert not (out / "dead_letter.jsonl").exists() or not (out / "dead_letter.jsonl").read_text().strip()


def test_waiting_retractions_round_trip_through_the_checkpoint_state():
    from orchestrator.retract import Retractions

    r = Retractions([{"id": "u1", "after": 8}])
    r.add("u9", 12)
    assert Retractions(r.state()).state() == [{"id": "u1", "after": 8}, {"id": "u9", "after": 12}]
