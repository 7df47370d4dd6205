"""``wisestream bench profile``: the engine's stages add up to its time, and the real job runs on the same edits
(with and without continuous evaluation) with its edits/s set against the engine's."""

from __future__ import annotations

import json

import pytest

from bench.profile import (
    ENGINE_STAGES,
    LEVERS,
    StageClock,
    engine_profile,
    lever_variants,
)
from orchestrator.config import load_config
from orchestrator.inputs import stream_sample


def test_stage_clock_times_and_restores_what_it_wraps():
    class Thing:
        def work(self, x):
            return x + 1

    thing, clock = Thing(), StageClock()
    with clock.patch(thing, "work", "w"):
        assert thing.work(1) == 2 and thing.work(2) == 3
    assert clock.calls["w"] == 2 and clock.seconds["w"] > 0
    assert "work" not in vars(thing)  # the instance attribute is gone again
    with clock.patch(Thing, "work", "cls"), pytest.raises(TypeError):
        thing.work()  # a failing call is timed too, and the class method comes back afterwards
    assert clock.calls["cls"] == 1 and Thing.work.__name__ == "work"


def test_engine_stages_account_for_its_seconds(job_files):
    cfg = load_config(job_files, ["runtime.shards_per_editor=2", "checkpoint.every=2"])
    res = engine_profile(cfg, stream_sample(cfg, 12))
    stages = res["stages"]
    assert set(ENGINE_STAGES) <= set(stages)
    for stage in ("frozen_prefix", "upper_forward", "backward", "tokenise", "store_and_merge"):
        assert stages[stage] > 0, stage
    # the engine stages (with the unattributed rest) are the engine's time; checkpoint and transfer lie outside
    inside = sum(v for k, v in stages.items() if k not in ("checkpoint", "transfer"))
    assert inside * res["edits"] == pytest.approx(res["seconds"], rel=1e-6)
    assert abs(stages["other"]) < 0.25 * inside
    # 12 edits in 4-edit shards, 2 per call, 2 edits per shard between commits: 2 groups x 2 calls
    assert res["edits"] == 12 and res["checkpoints"] == 4
    assert res["checkpoint_bytes"] > 0 and res["transfer_bytes"] > 0
    assert res["steps_per_edit"] == 8  # early_stop_loss 0: every edit runs n_iter steps


@pytest.mark.slow  # a benchmark command that runs the whole job beside its engine
def test_profile_command_runs_the_job_beside_the_engine(job_files, ray_local, tmp_path, capsys):
    from wisestream.cli import main

    out = tmp_path / "profile.json"
    argv = [
        "bench",
        "profile",
        "--edits",
        "8",
        "--config",
        str(job_files),
        "--set",
        "eval.every=4",
        "--levers",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())["result"]
    assert res["edits"] == 8 and res["config"]["eval_every"] == 4
    jobs = res["jobs"]
    assert set(jobs) == {"as_configured", "eval_off"}
    assert jobs["as_configured"]["evaluations"] >= 1 and jobs["eval_off"]["evaluations"] == 0
    for job in jobs.values():
        assert job["edits"] == 8
        assert job["ratio_to_engine"] == pytest.approx(
            job["edits_per_second"] / res["engine"]["edits_per_second"]
        )
    assert "job (eval_off)" in printed and "frozen_prefix" in printed
    levers = res["levers"]
    assert set(levers) == set(LEVERS)
    engine = res["engine"]
    for lever in levers.values():
        assert lever["gain"] == pytest.approx(lever["seconds_per_edit"] * engine["edits_per_second"])
    assert levers["one torch thread"]["threads"] == 1


def test_each_lever_variant_changes_only_its_own_setting(job_files):
    cfg = load_config(job_files, ["wise.keyed.early_stop_loss=0.5", "runtime.shards_per_editor=3"])
    variants = lever_variants(cfg)

    def dump(c):
        return c.model_dump(mode="json")

    early, _ = variants["early stop off (every edit runs keyed.n_iter steps)"]
    assert early.wise.keyed.early_stop_loss == 0 and early.runtime.shards_per_editor == 3
    assert dump(early.wise) == {**dump(cfg.wise), "keyed": {**dump(cfg.wise.keyed), "early_stop_loss": 0.0}}
    one, _ = variants["one shard per call (no lock-step batch of a merge group)"]
    assert one.runtime.shards_per_editor == 1 and dump(one.wise) == dump(cfg.wise)
    same, threads = variants["one torch thread"]
    assert dump(same) == dump(cfg) and threads == 1
