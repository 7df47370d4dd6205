"""The relation-key benchmark: its router key is the router's own (the key an edit stores and the similarity a
routed query gets), and its separation measure orders, thresholds and counts as documented."""

import pytest
import torch
from helpers import tiny_keyed_config

from bench.relations import KEYS, KeyProbe, load_relations_config, measure, sentence_start, separation
from orchestrator.config import ConfigError
from wise.keyed.editor import KeyedEditor


def test_separation_orders_thresholds_and_counts():
    apart = separation([0.9, 0.8, 0.7, 0.6], [0.1, 0.2], (1.0, 0.75))
    assert apart["auc"] == 1.0
    # keeping every rephrase: threshold at the lowest (0.6), both negatives refused
    assert apart["thresholds"][0] == {"keep": 1.0, "threshold": 0.6, "kept": 1.0, "refused": 1.0}
    assert apart["thresholds"][1]["threshold"] == 0.7 and apart["thresholds"][1]["kept"] == 0.75
    crossed = separation([0.1, 0.5], [0.3, 0.5], (1.0,))
    # pairs ordered right: (0.5, 0.3) only; (0.5, 0.5) is a tie (half); the rest wrong
    assert crossed["auc"] == pytest.approx((1 + 0.5) / 4)
    assert crossed["thresholds"][0]["refused"] == 0.0
    with pytest.raises(ValueError):
        separation([], [0.1], (0.9,))


def test_sentence_start_is_after_the_last_sentence_end_before_the_subject():
    ends = {9}
    assert sentence_start([1, 2, 9, 3, 4, 9, 5], before=4, ends=ends) == 3
    assert sentence_start([1, 2, 3], before=2, ends=ends) == 0
    assert sentence_start([9, 9, 1], before=3, ends=ends) == 2


@pytest.mark.parametrize(
    ("relation_key", "name", "settings"),
    # the residual key kept whole: relation_dim is the tiny model's width (32)
    [("mean", "router", {}), ("residual", "residual_last", {"relation_dim": 32})],
)
def test_router_key_is_the_one_the_edit_stores_and_the_router_compares(
    tiny_model, tiny_tokenizer, edits, pool, relation_key, name, settings
):
    cfg = tiny_keyed_config(5, relation_key=relation_key, **settings)
    ed = KeyedEditor(tiny_model, tiny_tokenizer, cfg, irrelevant=pool)
    ed.apply(edits)
    probe = KeyProbe(ed.trainer)
    assert torch.allclose(probe.center[name], ed.trainer.center.float(), atol=1e-4)
    stored = torch.cat([m.relkeys for m in ed.routable()]).float()
    ids = [e for m in ed.routable() for e in m.edit_ids]
    query = "Danielle Darrieux speaks"
    for rec in edits:
        variants = ed.trainer.subject_variants(rec)
        key = probe.keys(rec.prompt, variants)
        assert set(key) == set(KEYS)
        assert all(abs(float(v.norm()) - 1.0) < 1e-4 for v in key.values())
        assert torch.allclose(key[name], stored[ids.index(rec.id)], atol=2e-3), rec.id
    # the similarity the router computes for a routed query is the benchmark's router-key cosine
    batch = ed.tokens.collate([ed.tokens.row(query, "x", "{}")])
    with ed.routed.query_span(batch.span):
        ed.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    assert int(ed.routed.last_choice[0]) == ids.index("e0")
    routed_similarity = float(ed.routed.last_ratio[0]) - 1.0  # before the probe's own forwards reset it
    want = float(stored[ids.index("e0")] @ probe.keys(query, ed.trainer.subject_variants(edits[0]))[name])
    assert routed_similarity == pytest.approx(want, abs=2e-3)


def test_measure_pairs_rephrases_and_other_relations(tiny_model, tiny_tokenizer, edits, pool):
    ed = KeyedEditor(tiny_model, tiny_tokenizer, tiny_keyed_config(5), irrelevant=pool)
    ed.trainer.ensure_ready()
    out = measure(KeyProbe(ed.trainer), edits[2:], edits[:2], (0.9,), examples=2)
    # rephrases: e0, e1, e3 have one each (e2 none); other relations: the two `other` records' locality prompts
    assert out["rephrases"] == 3 and out["other_relations"] == 2
    assert set(out["keys"]) == set(KEYS)
    assert all(0.0 <= v["auc"] <= 1.0 for v in out["keys"].values())
    assert len(out["examples"]) <= 2


def test_relations_config_rejects_unknown_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("dev: {path: d.json}\nother: {path: o.jsonl}\nthreshold: 3\n")
    with pytest.raises(ConfigError, match="threshold"):
        load_relations_config(path)


def test_report_section_shows_every_key_and_the_disjoint_rephrases():
    from bench.report_gate import relations_section

    def key(auc, refused):
        return {
            "auc": auc,
            "thresholds": [{"keep": 0.98, "threshold": 0.1, "kept": 0.98, "refused": refused}],
        }

    result = {
        "rephrases": 1070,
        "other_relations": 70,
        "dev_records": 1000,
        "other_records": 70,
        "keys": {"router": key(0.565, 0.014), "answer": key(0.8, 0.243)},
        "answer_disjoint": 0.238,
        "examples": [{"prompt": "P is located in", "rephrase": "People in P speak", "answer_cosine": 0.0004}],
        "command": "wisestream bench relations",
    }
    text = "\n".join(relations_section(result))
    assert text.startswith("## Relation keys")
    assert "| key | AUC | refused at keep 0.98 |" in text
    assert "| router (mean over the prompt besides the subject; the gate's key) | 0.565 | 0.014 |" in text
    assert "| unedited next-token distribution (not a one-pass key) | 0.800 | 0.24 |" in text
    assert "24% of the rephrases" in text and "| P is located in | People in P speak | 0.000 |" in text
    assert relations_section(None) == []


def test_a_method_that_is_not_keyed_wise_is_one_clear_error():
    from bench.quality import keyed_method, load_quality_config

    qcfg = load_quality_config("configs/bench/quality.yaml")
    for name, message in (
        ("nope", "'nope' is not a wise method"),
        ("ft-l", "'ft-l' is not a wise method"),
        ("wise-retrieve", "'wise-retrieve' is not the keyed layout"),
    ):
        with pytest.raises(ConfigError, match=f"relations.method: {message}"):
            keyed_method(qcfg, name, "relations.method")
    settings, pool = keyed_method(qcfg, "keyed-values-residual", "relations.method")
    assert settings.keyed.relation_key == "residual" and len(pool) == 400
