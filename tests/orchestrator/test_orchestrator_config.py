from pathlib import Path

import pytest

from orchestrator.config import ConfigError, build_config, load_config, parse_overrides

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_names_its_command(path):
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "wisestream" in first, (
        f"{path.name} must open with the command that runs it"
    )
    if cfg.stream.path:
        assert (path.parents[1] / cfg.stream.path).exists(), cfg.stream.path


def test_there_is_a_default_config():
    assert any(p.name == "default.yaml" for p in CONFIGS)


def test_overrides_are_typed_and_nested():
    cfg = build_config({}, ["wise.layer=20", "eval.generate=false", "wise.keyed.columns=32", "max_edits=7"])
    assert (
        cfg.wise.layer == 20
        and cfg.eval.generate is False
        and cfg.wise.keyed.columns == 32
        and cfg.max_edits == 7
    )
    shards = build_config({}, ["wise.layout=shards", "wise.margins.alpha=3"])
    assert shards.wise.layout == "shards" and shards.wise.margins.alpha == 3


def test_overrides_leave_the_callers_mapping_alone():
    data = {"wise": {"keyed": {"columns": 16}}}
    first = build_config(data, ["wise.keyed.early_stop_loss=0"])
    second = build_config(data)
    assert data == {"wise": {"keyed": {"columns": 16}}}
    assert first.wise.keyed.early_stop_loss == 0 and second.wise.keyed.early_stop_loss == 0.02


def test_a_key_of_the_other_layout_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"wise: margins: only for layout 'shards'"):
        build_config({}, ["wise.margins.alpha=3"])
    with pytest.raises(ConfigError, match=r"wise: keyed: only for layout 'keyed'"):
        build_config({}, ["wise.layout=shards", "wise.keyed.columns=8"])
    assert parse_overrides(["stream.path=a=b.json"]) == [("stream.path", "a=b.json")]


@pytest.mark.parametrize(
    ("data", "overrides", "message"),
    [
        ({"stream": {"fromat": "jsonl"}}, [], r"stream\.fromat: unknown key"),
        (
            {},
            ["wise.save_freq=300", "wise.merge_freq=1000"],
            r"wise: merge_freq \(1000\) must be a multiple of save_freq \(300\)",
        ),
        ({}, ["wise.mask_ratio=2"], r"wise\.mask_ratio: .*less than or equal to 1.*got 2"),
        ({}, ["wise.router_reduce=median"], r"wise\.router_reduce"),
        ({}, ["max_edits=0"], r"max_edits: .*greater than or equal to 1"),
        ({}, ["nonsense"], r"must look like key\.sub=value"),
        ({"wise": 3}, ["wise.layer=2"], r"wise is a value"),
        ({}, ["wise.keyed.relation_key=last"], r"wise\.keyed\.relation_key: .*'mean' or 'residual'"),
    ],
)
def test_bad_config_errors_name_the_key(data, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(data, overrides)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("wise: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("wise:\n  lyaer: 3\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: wise\.lyaer: unknown key"):
        load_config(typo)
