"""``wisestream bench merges``: refuses what it cannot trace before loading a model, and (real model) its
measurements agree with the bank's own thresholds and with the memory each group started from."""

import json
from pathlib import Path

import pytest
import torch

from bench.merges import _scores, merge_trace
from bench.quality import load_quality_config
from orchestrator.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_scores_are_the_routers_and_centring_subtracts_the_center():
    g = torch.Generator().manual_seed(0)
    delta, key = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    per_token = (key @ delta.T).norm(dim=-1)
    assert _scores(delta, [key], False, "mean") == pytest.approx([float(per_token.mean())])
    assert _scores(delta, [key], False, "max") == pytest.approx([float(per_token.max())])
    assert _scores(delta.T.contiguous(), [key], True, "mean") == pytest.approx([float(per_token.mean())])
    center = key.mean(0)
    centred = float(((key - center) @ delta.T).norm(dim=-1).mean())
    assert _scores(delta, [key], False, "mean", center) == pytest.approx([centred])
    assert _scores(delta, [key[:1]], False, "mean", key[0]) == [0.0]


@pytest.mark.parametrize(
    "run, edits, overrides, message",
    [
        ("wise-merge/nope", 30, [], "unknown run 'wise-merge/nope'"),
        ("ft-l/zsre", 30, [], "is ft-l, not WISE"),
        ("wise-retrieve/zsre", 30, [], "is WISE-Retrieve"),
        ("wise-merge/zsre", 4, [], "below merge_freq 10"),
        ("wise-merge/zsre", 30, ["merge_fre=4"], "merge_fre"),
        ("wise-merge/zsre", 30, ["merge_freq"], "must look like key.sub=value"),
        ("wise-merge/zsre", 2000, [], "998 valid edits, fewer than --edits 2000"),
    ],
)
def test_trace_refuses_what_it_cannot_trace_with_a_clear_error(monkeypatch, run, edits, overrides, message):
    monkeypatch.chdir(ROOT)
    qcfg = load_quality_config("configs/bench/quality.yaml")
    with pytest.raises(ConfigError, match=message):
        merge_trace(qcfg, run, edits, overrides=overrides)


def test_trace_refuses_zero_probes(monkeypatch):
    monkeypatch.chdir(ROOT)
    qcfg = load_quality_config("configs/bench/quality.yaml")
    with pytest.raises(ConfigError, match="--probes 0: measure at least one unrelated prompt"):
        merge_trace(qcfg, "wise-merge/zsre", 30, probes=0)


@pytest.mark.model
@pytest.mark.slow
def test_trace_of_two_merges_on_the_real_model(monkeypatch, tmp_path):
    from wisestream.cli import main

    monkeypatch.chdir(ROOT)
    out = tmp_path / "merges.json"
    argv = ["bench", "merges", "--smoke", "--edits", "4", "--probes", "6"]
    argv += ["--set", "save_freq=1", "--set", "merge_freq=2", "--out", str(out)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert record["command"].startswith("wisestream bench merges --smoke")
    res = record["result"]
    assert res["settings"]["merge_freq"] == 2 and res["probes"] == 6
    first, second = res["merges"]
    assert [first["edits"], second["edits"]] == [2, 4]
    assert [[s["shard"] for s in m["shards"]] for m in (first, second)] == [[0, 1], [2, 3]]
    assert first["base"] == {"norm": 0.0, "unrelated": 0.0}  # the first group starts from the main memory
    # the second group started from the first merged memory: same norm, same activation on the same prompts
    assert second["base"]["norm"] == pytest.approx(first["merged"]["norm"], rel=1e-5)
    assert second["base"]["unrelated"] == pytest.approx(first["merged"]["unrelated"], rel=1e-4)
    act_ratio = res["settings"]["act_ratio"]
    for m in (first, second):
        merged = m["merged"]
        # the trace's activations are the router's: the bank's threshold is act_ratio x their minimum
        assert merged["threshold"] == pytest.approx(act_ratio * merged["edits_min"], rel=1e-3)
        assert 0.0 <= merged["unrelated_routed"] <= 1.0 and merged["edits_mean"] >= merged["edits_min"] > 0
        assert all(s["added_norm"] > 0 and s["own_edits"] > 0 for s in m["shards"])
        c = m["centred"]  # the benchmark config has an irrelevant pool: its mean is the centre
        assert (
            c["threshold"] == pytest.approx(act_ratio * c["edits_min"]) and 0.0 <= c["unrelated_routed"] <= 1
        )
        assert c["unrelated"] != pytest.approx(merged["unrelated"], rel=1e-3)
