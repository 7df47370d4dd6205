"""``wisestream bench engines``: seconds per edit of the default editor against the 2-edit-shard editor and
against WISE's reference settings, on the same model and the same edits, in one run.

Three sides, each a fresh copy of the same model:

- ``default``: the job config's editor (the keyed layout in ``configs/default.yaml``);
- ``2-edit``: the compared config's editor (``configs/wise-2edit.yaml``: 2-edit dense shards, 16 irrelevant
  inputs, margins (15, 30, 10), the cached engine);
- ``reference``: the same 2-edit config with WISE's reference settings: margins (5, 20, 10), one irrelevant
  input per edit and the naive engine, which runs the full forward pass at every optimisation step.

Each side prepares outside the timed region (templates, pool activations), applies the edits sequentially and
is measured on them (teacher-forced and free generation, the routing rule of its own layout). The result gives
each side's seconds per edit, optimizer steps per edit, metrics, and the ratios ``<side> / default``.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch

from orchestrator.config import JobConfig
from orchestrator.inputs import irrelevant_pool, stream_sample
from orchestrator.model_store import load_model
from wise.config import MarginConfig, WiseConfig
from wise.evaluate import evaluate_records
from wise.factory import make_editor

logger = logging.getLogger(__name__)

SIDES = ("default", "2-edit", "reference")


def reference_settings(wise: WiseConfig) -> WiseConfig:
    """``wise`` with WISE's reference margins (5, 20, 10) and one random irrelevant input per edit."""
    return wise.model_copy(
        update={
            "margins": MarginConfig(alpha=5.0, beta=20.0, gamma=10.0, scale="absolute"),
            "n_irrelevant": 1,
            "hard_negatives": 0.0,
        }
    )


def engine_comparison(cfg: JobConfig, compare: JobConfig, n_edits: int = 20) -> dict[str, Any]:
    """Time ``n_edits`` sequential edits with each side (module docstring) and measure each on them.

    Args:
        cfg: the default job config (its stream gives the edits, its model the model).
        compare: a config with ``wise.layout: shards`` (the 2-edit editor; the reference derives from it).
        n_edits: edits applied by each side.

    Returns:
        ``{"edits", "sides": {name: {"seconds_per_edit", "steps_per_edit", "metrics", "settings"}},
        "ratio_vs_reference", "ratio_vs_2edit"}``.

    Raises:
        ValueError: ``compare`` is not a shards-layout config, or the stream has no edits.
    """
    if compare.wise.layout != "shards":
        raise ValueError(
            "bench engines compares against a wise.layout: shards config (configs/wise-2edit.yaml)"
        )
    records = stream_sample(cfg, n_edits, "bench engines")
    model, tokenizer = load_model(cfg)
    sides = {
        "default": (cfg.wise, irrelevant_pool(cfg), "cached"),
        "2-edit": (compare.wise, irrelevant_pool(compare), "cached"),
        "reference": (reference_settings(compare.wise), irrelevant_pool(compare), "naive"),
    }
    out: dict[str, Any] = {"edits": len(records), "threads": torch.get_num_threads(), "sides": {}}
    for name, (wise, pool, engine) in sides.items():
        editor = make_editor(copy.deepcopy(model), tokenizer, wise, pool, engine)
        editor.prepare()
        logger.info("bench engines: %s, %d edits", name, len(records))
        t0 = time.perf_counter()
        outcomes = editor.apply(records)
        elapsed = time.perf_counter() - t0
        res = evaluate_records(editor.model, editor.routed, editor.tokens, records, generate=True)
        out["sides"][name] = {
            "seconds_per_edit": elapsed / len(records),
            "steps_per_edit": sum(o.steps for o in outcomes) / len(outcomes),
            "metrics": {"teacher_forced": res["teacher_forced"], "generate": res["generate"]},
            "engine": engine,
            "settings": wise.model_dump(mode="json"),
        }
        logger.info("bench engines: %s %.2f s/edit", name, elapsed / len(records))
        del editor
    s = {k: v["seconds_per_edit"] for k, v in out["sides"].items()}
    out["ratio_vs_reference"] = s["reference"] / s["default"]
    out["ratio_vs_2edit"] = s["2-edit"] / s["default"]
    return out


__all__ = ["SIDES", "engine_comparison", "reference_settings"]
