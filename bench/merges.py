"""``wisestream bench merges``: what every merge of a WISE-Merge run does to routing.

A side memory answers a query when its routing activation ``||Delta a||`` (mean over the query's tokens) is
above its threshold, ``act_ratio`` x the lowest activation on its own edits. This traces one sequential
WISE-Merge run of the quality benchmark: at each merge it measures, on the run's own edits and on unrelated
prompts (the dataset's locality prompts), the activation of the memory the group started from, of each shard
of the group, and of the merged memory, with the norms of their task vectors. When the merged memory's
activation on unrelated prompts comes up to its threshold, the router sends them to it and locality is lost.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from bench.quality import QualityConfig, dataset_records, make_editor, method_settings
from orchestrator.config import ConfigError, build_config, format_errors, parse_overrides, set_path
from wise.memory import key_scores

logger = logging.getLogger(__name__)


def _settings(spec, overrides: Sequence[str]):
    """The method's WISE settings with ``key=value`` overrides (``merge_freq=4``, ``merge.density=0.3``)."""
    from pydantic import ValidationError

    from wise.config import WiseConfig

    tree = method_settings(spec).model_dump()
    for key, value in parse_overrides(overrides):
        set_path(tree, key, value)
    try:
        return WiseConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError("--set: " + format_errors(err)) from None


def _scores(
    delta: torch.Tensor,
    keys: Sequence[torch.Tensor],
    transposed: bool,
    reduce: str,
    center: torch.Tensor | None = None,
) -> list[float]:
    """Routing score of ``delta`` on each prompt (its edited-projection inputs ``keys[i]``: (p_i, d_in)), as the
    router computes it (:func:`~wise.memory.key_scores`); with ``center`` (d_in,), on ``a - center``."""
    if center is not None:
        keys = [k.float() - center.float() for k in keys]
    with torch.no_grad():
        return key_scores(delta, list(keys), transposed, reduce).tolist()


def merge_trace(
    qcfg: QualityConfig,
    run_name: str,
    n_edits: int,
    probes: int = 60,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Apply the first ``n_edits`` edits of the WISE-Merge run ``run_name`` and measure every merge.

    Args:
        qcfg: the quality benchmark config (the run's method, dataset and irrelevant pool).
        run_name: ``method/dataset`` of a WISE run with ``retrieve: false``.
        n_edits: edits to apply (merges happen every ``merge_freq`` of them).
        probes: unrelated prompts measured: the locality prompts of the dataset's first ``probes`` records.
        overrides: ``key=value`` changes to the method's WISE settings.

    Returns:
        ``{"run", "edits", "probes", "settings", "merges": [...]}``; per merge: ``edits`` (applied so far),
        ``base`` (norm and mean unrelated activation of the memory the group started from), ``shards`` (per
        shard: norm of what it added, mean activation on unrelated prompts and on its own edits) and
        ``merged`` (norm, threshold, min / mean activation on all its edits, mean activation on unrelated
        prompts and the fraction of them above the threshold) and ``centred``: the merged memory's activations
        on inputs centred on the irrelevant pool's mean prompt activation (what a router that subtracts that
        mean would see; its threshold is computed the same way).

    Raises:
        ConfigError: unknown run, a method that is not WISE-Merge, bad overrides, too few edits for a merge or
            in the dataset.
    """
    from orchestrator.inputs import irrelevant_pool
    from orchestrator.model_store import load_model

    runs = {r.name: r for r in qcfg.runs}
    if run_name not in runs:
        raise ConfigError(f"unknown run {run_name!r}; choose among {sorted(runs)}")
    run = runs[run_name]
    spec, dataset = qcfg.methods[run.method], qcfg.datasets[run.dataset]
    if spec.kind != "wise":
        raise ConfigError(f"run {run_name} is {spec.kind}, not WISE: it has no merges to trace")
    settings = _settings(spec, overrides)
    if settings.retrieve:
        raise ConfigError(f"run {run_name} is WISE-Retrieve (retrieve: true): trace a WISE-Merge run")
    if probes < 1:
        raise ConfigError(f"--probes {probes}: measure at least one unrelated prompt")
    if n_edits < settings.merge_freq:
        raise ConfigError(f"--edits {n_edits} is below merge_freq {settings.merge_freq}: no merge would run")
    records = dataset_records(dataset, max(n_edits, probes))
    if len(records) < n_edits:
        raise ConfigError(
            f"dataset {dataset.path} has {len(records)} valid edits, fewer than --edits {n_edits}"
        )
    unrelated = [r.locality_prompt for r in records[:probes] if r.locality_prompt]
    records = records[:n_edits]
    if not unrelated:
        raise ConfigError(f"dataset {dataset.path}: its records have no locality prompt to measure")

    pool = irrelevant_pool(build_config({"irrelevant": dataset.irrelevant})) if dataset.irrelevant else []
    model, tokenizer = load_model(build_config({"model": qcfg.model.model_dump()}))
    editor = make_editor("wise", settings, model, tokenizer, pool)
    editor.prepare()
    probe_keys = editor.prompt_keys(unrelated)
    center = None
    if pool:  # the pool's mean prompt activation: mean over prompts of the mean over their tokens
        center = torch.stack([k.float().mean(0) for k in editor.prompt_keys([p for p, _ in pool])]).mean(0)
    transposed, reduce = editor.bank.transposed, settings.router_reduce
    merges: list[dict[str, Any]] = []

    def unrelated_mean(delta: torch.Tensor) -> float:
        return statistics.fmean(_scores(delta, probe_keys, transposed, reduce))

    def on_merge(group, base, merged) -> None:
        start = torch.zeros_like(group[0].delta) if base is None else base
        on_probes = _scores(merged.delta, probe_keys, transposed, reduce)
        on_edits = _scores(merged.delta, merged.keys, transposed, reduce)
        row = {
            "edits": len(merged.edit_ids),
            "base": {
                "norm": float(start.norm()),
                "unrelated": 0.0 if base is None else unrelated_mean(base),
            },
            "shards": [
                {
                    "shard": m.shard_ids[0],
                    "added_norm": float((m.delta - start).norm()),
                    "unrelated": unrelated_mean(m.delta),
                    "own_edits": statistics.fmean(_scores(m.delta, m.keys, transposed, reduce)),
                }
                for m in group
            ],
            "merged": {
                "norm": float(merged.delta.norm()),
                "threshold": merged.threshold,
                "edits_min": min(on_edits),
                "edits_mean": statistics.fmean(on_edits),
                "unrelated": statistics.fmean(on_probes),
                "unrelated_routed": sum(s > merged.threshold for s in on_probes) / len(on_probes),
            },
        }
        if center is not None:
            c_edits = _scores(merged.delta, merged.keys, transposed, reduce, center)
            c_probes = _scores(merged.delta, probe_keys, transposed, reduce, center)
            c_threshold = settings.act_ratio * min(c_edits)
            row["centred"] = {
                "threshold": c_threshold,
                "edits_min": min(c_edits),
                "unrelated": statistics.fmean(c_probes),
                "unrelated_routed": sum(s > c_threshold for s in c_probes) / len(c_probes),
            }
        merges.append(row)
        m = row["merged"]
        logger.info(
            "merge at %d edits: shards' unrelated activation %s -> merged %.1f (threshold %.1f, edits min %.1f), "
            "%.0f%% of unrelated prompts routed to it",
            row["edits"],
            [round(s["unrelated"], 1) for s in row["shards"]],
            m["unrelated"],
            m["threshold"],
            m["edits_min"],
            100 * m["unrelated_routed"],
        )
        if "centred" in row:
            c = row["centred"]
            logger.info(
                "  centred on the pool's mean activation: unrelated %.1f, edits min %.1f, %.0f%% routed",
                c["unrelated"],
                c["edits_min"],
                100 * c["unrelated_routed"],
            )

    editor.bank.on_merge = on_merge
    for i in range(0, n_edits, settings.merge_freq):
        editor.apply(records[i : i + settings.merge_freq])
        logger.info("%s: %d / %d edits applied", run_name, editor.n_edits, n_edits)
    return {
        "run": run_name,
        "edits": n_edits,
        "probes": len(unrelated),
        "settings": settings.model_dump(mode="json"),
        "merges": merges,
    }
