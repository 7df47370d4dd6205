"""The keyed layout's output vectors (``wise.keyed.values``, ``wise.keyed.value_lr``), chosen on the development
split (``wisestream bench values``; config ``configs/bench/values.yaml``).

Each setting of the grid edits the gate benchmark's development stream (``configs/bench/gate.yaml``: the first
300 development CounterFact records with the development same-subject edits mixed in) into a work directory of
its own, resumably, and is probed with :func:`bench.gate.develop` (the pre-edit probes are shared: they do not
depend on the settings). The rule, fixed before the runs: the setting with the highest mean of teacher-forced
reliability, generalization and locality over all development edits, with whole names on and no gate. Nothing
here reads a test record.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from bench.gate import develop, load_gate_config
from bench.milestones import write_json
from bench.quality import QualityConfig, keyed_method, load_quality_config, load_spec
from orchestrator.config import ConfigError, format_errors
from wise.config import FrozenConfig

logger = logging.getLogger(__name__)

TF = ("reliability", "generalization", "locality")


class ValuesSpec(FrozenConfig):
    """The settings tried and where."""

    gate: str = Field("configs/bench/gate.yaml", description="the gate benchmark: development stream, method")
    output: str = Field("benchmarks/results/values.json", description="the result (committed)")
    grid: tuple[dict[str, Any], ...] = Field(
        min_length=1, description="wise.keyed overrides tried, one setting each"
    )


def load_values_config(path: str | Path) -> ValuesSpec:
    """Load ``configs/bench/values.yaml``.

    Raises:
        ConfigError: unknown keys or bad values, with the key path.
    """
    return load_spec(ValuesSpec, path)


def tag(override: dict[str, Any]) -> str:
    """A setting's work directory name: ``values-off`` or ``values-lr<value_lr>``."""
    if not override.get("values"):
        return "values-off"
    return f"values-lr{override.get('value_lr', 'default')}"


def score(row: dict[str, Any]) -> float:
    """The rule's number: mean of teacher-forced rel, gen and loc over all development edits."""
    tf = row["all"]["teacher_forced"]
    return sum(tf[k] for k in TF) / len(TF)


def choose(rows: list[dict[str, Any]]) -> int:
    """Index of the row the rule picks (the first of equal scores)."""
    return max(range(len(rows)), key=lambda i: (score(rows[i]), -i))


def values_benchmark(spec: ValuesSpec, out: Path, command: str) -> dict[str, Any]:
    """Edit and probe the development stream under every setting of the grid, choose one; write ``out``."""
    from bench.quality import machine, make_editor
    from orchestrator.config import build_config
    from orchestrator.model_store import load_model

    gate = load_gate_config(spec.gate)
    qcfg: QualityConfig = load_quality_config(gate.quality)
    base, pool = keyed_method(qcfg, gate.method, f"{spec.gate}: method")
    job_cfg = build_config({"model": qcfg.model.model_dump()})
    work = Path(qcfg.work)
    pre = work / "gate-dev" / gate.method / "probes-pre"
    rows = []
    for override in spec.grid:
        try:
            settings = type(base).model_validate(
                {**base.model_dump(), "keyed": {**base.keyed.model_dump(), **override}}
            )
        except ValidationError as err:
            raise ConfigError(
                f"values.grid {override}: " + "; ".join(format_errors(err).splitlines())
            ) from None

        def make(settings=settings):
            model, tokenizer = load_model(job_cfg)
            return make_editor("wise", settings, model, tokenizer, pool)

        logger.info("values: development edits with wise.keyed %s", override)
        # the method's own settings are the gate benchmark's development run: reuse it
        where = work if settings == base else work / "values-dev" / tag(override)
        dev = develop(qcfg, gate, settings, make, where, pre_cache=pre)
        names = next(r for r in dev["names_rows"] if r["whole_names"])
        rows.append(
            {
                "keyed": override,
                **{k: names[k] for k in names if k != "whole_names"},
                "mean": score(names),
                "seconds_per_edit": dev["seconds_per_edit"],
                "steps_per_edit": dev["steps_per_edit"],
                "gate_rows": dev["rows"],
            }
        )
    best = choose(rows)
    result = {
        "edits": dev["edits"],
        "rows": rows,
        "chosen": rows[best]["keyed"],
        "rule": "the highest mean of teacher-forced reliability, generalization and locality over all "
        "development edits (whole names on, no gate)",
        "command": command,
        "machine": machine(),
    }
    write_json(out, result)
    return result


__all__ = ["ValuesSpec", "choose", "load_values_config", "score", "tag", "values_benchmark"]
