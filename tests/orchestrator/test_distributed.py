"""The job on a real local Ray: equivalence with the single-process editor, parallel and batched shards,
kill -9 of the driver and of an editor, and continuous evaluation. A tiny random Llama saved as a checkpoint."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psutil
import pytest
import torch
from helpers import n_iter

from orchestrator.inputs import irrelevant_pool
from orchestrator.job import run_job
from wise.factory import make_editor
from wise.state import read_state


def _cfg(config: Path, out: Path, *extra: str):
    from orchestrator.config import load_config

    return load_config(config, [f"output.dir={out}", *extra])


def _state(out: Path):
    return read_state(out / "state")


def _assert_same_state(a, b, atol=1e-6):
    (ta, ma), (tb, mb) = a, b
    assert ta.keys() == tb.keys()
    for k in ta:
        # routing keys are stored in float16: a batch of another width may round them differently
        tol = {"atol": 2e-3, "rtol": 2e-3} if ta[k].dtype == torch.float16 else {"atol": atol, "rtol": 1e-4}
        assert torch.allclose(ta[k].float(), tb[k].float(), **tol), k
    for kind in ("merged", "pending"):
        assert [m["edit_ids"] for m in ma[kind]] == [m["edit_ids"] for m in mb[kind]]
        for x, y in zip(ma[kind], mb[kind], strict=True):
            assert x["threshold"] == pytest.approx(y["threshold"], rel=1e-4)
    assert ma["active"]["edit_ids"] == mb["active"]["edit_ids"]
    assert ma["templates"] == mb["templates"]


@pytest.fixture
def reference(ray_local, job_files, tmp_path):
    """One uninterrupted run with one editor training one shard at a time."""
    out = tmp_path / "ref"
    report = run_job(_cfg(job_files, out, "max_edits=22"))
    return out, report


def test_one_editor_equals_the_single_process_engine(reference, job_files, tiny_tokenizer, model_dir):
    out, report = reference
    assert report["edits_applied"] == 22 and report["duplicates_applied"] == 0 and report["edits_lost"] == 0
    # 22 edits in 4-edit shards: 5 stored shards merged every 8 edits (2 merges + 1 pending) and an active shard
    tensors, meta = _state(out)
    assert len(meta["merged"]) == 1 and len(meta["pending"]) == 1 and len(meta["active"]["edit_ids"]) == 2

    from transformers import AutoModelForCausalLM

    cfg = _cfg(job_files, out)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.set_num_threads(1)  # the editor actor trains with one thread: same reduction order
    ed = make_editor(model, tiny_tokenizer, cfg.wise, irrelevant=irrelevant_pool(cfg))
    records = [json.loads(line) for line in Path(cfg.stream.path).read_text().splitlines()][:22]

    class R:
        def __init__(self, d):
            self.id, self.prompt, self.target = d["id"], d["prompt"], d["target"]

    ed.apply([R(d) for d in records])
    _assert_same_state((tensors, meta), ed.state_dict())


@pytest.mark.parametrize(
    "editors,per_editor",
    [(2, 1), pytest.param(1, 3, marks=pytest.mark.slow)],  # 2 x 1 in the default suite
)
def test_parallel_and_batched_shards_give_the_same_state(reference, job_files, tmp_path, editors, per_editor):
    ref_out, _ = reference
    out = tmp_path / f"run-{editors}-{per_editor}"
    report = run_job(
        _cfg(
            job_files,
            out,
            "max_edits=22",
            f"runtime.editors={editors}",
            f"runtime.shards_per_editor={per_editor}",
            "runtime.editor_cpus=1",
        )
    )
    assert report["edits_applied"] == 22 and report["duplicates_applied"] == 0 and report["edits_lost"] == 0
    assert report["runtime"]["editors"] == editors
    _assert_same_state(_state(out), _state(ref_out), atol=1e-5)


def test_checkpoints_inside_shards_resume_and_finished_stream_is_not_reapplied(
    ray_local, job_files, tmp_path
):
    out = tmp_path / "ck"
    first = run_job(
        _cfg(job_files, out, "max_edits=10", "checkpoint.every=1", "eval.every=4", "eval.sample=4")
    )
    assert first["edits_applied"] == 10 and first["resumed_from"] is None
    assert first["runtime"]["checkpoints"] >= 10  # one per edit inside shards
    # continuous evaluation: measurements at 4 and 8 stored edits, also in metrics.jsonl
    assert [e["edits"] for e in first["evaluations"]] == [4, 8]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["edits"] for x in lines] == [4, 8] and all(0 <= x["reliability"] <= 1 for x in lines)
    # same command, more edits allowed: continues after the 10 applied ones (into the partial shard)
    second = run_job(_cfg(job_files, out, "max_edits=16", "checkpoint.every=1"))
    assert second["resumed_from"]["edits_applied"] == 10
    assert second["edits_applied"] == 16 and second["edits_applied_this_run"] == 6
    assert second["duplicates_applied"] == 0 and second["edits_lost"] == 0
    # the same command again: nothing left to apply, nothing applied twice
    third = run_job(_cfg(job_files, out, "max_edits=16", "checkpoint.every=1"))
    assert third["edits_applied"] == 16 and third["edits_applied_this_run"] == 0
    _, meta = _state(out)
    ids = [i for m in [*meta["merged"], *meta["pending"], meta["active"]] for i in m["edit_ids"]]
    assert ids == [f"u{i}" for i in range(16)]


def test_checkpoint_of_another_job_is_refused(ray_local, job_files, job_layout, tmp_path):
    from orchestrator.checkpoint import CheckpointError

    out = tmp_path / "other"
    run_job(_cfg(job_files, out, "max_edits=4"))
    with pytest.raises(CheckpointError, match=r"belongs to another job \(differs in \['wise'\]\)"):
        run_job(_cfg(job_files, out, "max_edits=4", n_iter(9, job_layout)))


# ---------------------------------------------------------------------------------------------- kill -9


SLOW = [n_iter(40), "max_edits=20", "checkpoint.every=1"]


@pytest.fixture
def slow_reference(ray_local, job_files, tmp_path):
    out = tmp_path / "slow-ref"
    run_job(_cfg(job_files, out, *SLOW))
    return out


def test_kill_9_of_the_driver_then_the_same_command_resumes_exactly(
    slow_reference, job_files, tmp_path, jobproc
):
    out = tmp_path / "killed"
    proc = jobproc.start(job_files, out, *SLOW)
    # kill in the middle of a shard, after at least one shard is stored
    jobproc.wait_for(
        lambda: jobproc.committed(out).get("next_store", 0) >= 2 and jobproc.committed(out).get("shards"),
        proc,
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = jobproc.committed(out)
    assert before["accepted"] < 20 or before["shards"]
    proc = jobproc.start(job_files, out, *SLOW)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from"]["edits_applied"] > 0
    assert report["edits_applied"] == 20 and report["duplicates_applied"] == 0 and report["edits_lost"] == 0
    # what the killed run had applied and checkpointed is not applied again; the rest is, once
    assert report["edits_applied_this_run"] == 20 - report["resumed_from"]["edits_applied"]
    _assert_same_state(_state(out), _state(slow_reference), atol=1e-5)


def test_an_editor_killed_mid_shard_is_replaced_and_nothing_is_lost(
    slow_reference, job_files, tmp_path, jobproc
):
    out = tmp_path / "actor-killed"
    proc = jobproc.start(job_files, out, *SLOW)

    def editor_busy():
        if jobproc.committed(out).get("next_store", 0) < 1 or not jobproc.committed(out).get("shards"):
            return None
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "EditorActor.train" in " ".join(p.cmdline()):
                    return p
            except psutil.Error:
                continue
        return None

    jobproc.wait_for(lambda: editor_busy() is not None, proc)
    victim = editor_busy()
    assert victim is not None
    victim.send_signal(signal.SIGKILL)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["actor_failures"] == 1, log[-3000:]
    assert report["edits_applied"] == 20 and report["duplicates_applied"] == 0 and report["edits_lost"] == 0
    _assert_same_state(_state(out), _state(slow_reference), atol=1e-5)


@pytest.mark.slow  # a benchmark command: the states it compares are the ones test_parallel_and_batched checks
def test_shards_benchmark_prints_edits_per_second_per_layout_and_equal_states(ray_local, job_files, capsys):
    from wisestream.cli import main

    args = ["bench", "shards", "--edits", "8", "--layouts", "1x1,1x2,2x1", "--config", str(job_files)]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["layouts"]) == {"1x1", "1x2", "2x1"}
    assert all(result[f"edits_per_second_{k}"] > 0 for k in ("1x1", "1x2", "2x1"))
    assert result["speedup_2x1"] == pytest.approx(
        result["edits_per_second_2x1"] / result["edits_per_second_1x1"]
    )
    # every layout trains the same shards: the same side memories (float16 routing keys round differently)
    assert max(result["max_state_diff"].values()) < 5e-3


def test_the_stream_is_read_only_as_fast_as_the_editors_consume_it(ray_local, job_files, tmp_path):
    from orchestrator.job import EditJob

    records = [
        json.loads(line) for line in Path(_cfg(job_files, tmp_path).stream.path).read_text().splitlines()
    ]
    lead: list[int] = []
    job: EditJob | None = None

    def source():
        for i, r in enumerate(records):
            # how far reading is ahead of what the editors have applied when record i is pulled
            lead.append(i - (job.book.n_applied() if job.editors else 0))
            yield r

    cfg = _cfg(job_files, tmp_path / "bp", "runtime.editors=1", "runtime.shards_per_editor=1")
    job = EditJob(cfg, records=source())
    try:
        job.setup()
        report = job.run()
    finally:
        job.cleanup()
    assert report["edits_applied"] == 24
    # one editor x one shard: the next shard is read only once the one in flight is applied, so reading is never
    # a whole shard (4 edits) ahead of the editors
    assert 0 < max(lead) < cfg.wise.save_freq, lead
