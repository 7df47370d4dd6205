"""Benchmarks. ``speed_benchmark``: the cached engine against the naive full-forward reference, in one run,
with the same model, edits and hyper-parameters; both must end with the same retention metrics."""

from __future__ import annotations

import copy
import logging
import os
import platform
import time
from typing import Any

import torch

from orchestrator.config import JobConfig
from orchestrator.job import irrelevant_pool, load_model
from streams import EditStream, open_source
from wise.editor import WiseEditor
from wise.evaluate import evaluate_records

logger = logging.getLogger(__name__)


def _metrics(editor: WiseEditor, records: list) -> dict[str, Any]:
    res = evaluate_records(editor.model, editor.routed, editor.tokens, records, generate=True)
    return {"teacher_forced": res["teacher_forced"], "generate": res["generate"]}


def speed_benchmark(cfg: JobConfig, n_edits: int = 3) -> dict[str, Any]:
    """Time ``n_edits`` sequential edits with each engine and compare the resulting retention metrics.

    Returns:
        ``seconds_per_edit_engine``, ``seconds_per_edit_naive``, ``ratio``, ``metrics_equal`` and details.
    """
    if cfg.stream.path is None:
        raise ValueError("the speed benchmark reads its edits from stream.path")
    records = [r for _, r in EditStream(open_source(cfg.stream.path, cfg.stream.format), max_records=n_edits)]
    pool = irrelevant_pool(cfg)
    model, tokenizer = load_model(cfg)
    naive_model = copy.deepcopy(model)
    result: dict[str, Any] = {"edits": len(records), "n_iter": cfg.wise.n_iter, "layer": cfg.wise.layer}
    metrics: dict[str, Any] = {}
    deltas: dict[str, torch.Tensor] = {}
    for name, m in (("engine", model), ("naive", naive_model)):
        editor = WiseEditor(
            m, tokenizer, cfg.wise, irrelevant=pool, engine="cached" if name == "engine" else "naive"
        )
        editor._ensure_ready()  # templates + margins outside the timed region, same for both
        logger.info("timing the %s over %d edits", name, len(records))
        t0 = time.perf_counter()
        outs = editor.apply(records)
        elapsed = time.perf_counter() - t0
        result[f"seconds_per_edit_{name}"] = elapsed / len(records)
        result[f"steps_{name}"] = [o.steps for o in outs]
        metrics[name] = _metrics(editor, records)
        deltas[name] = editor.active.delta.detach().clone()
        logger.info("%s: %.2f s/edit, metrics %s", name, elapsed / len(records), metrics[name])
    result["ratio"] = result["seconds_per_edit_naive"] / result["seconds_per_edit_engine"]
    result["metrics_engine"], result["metrics_naive"] = metrics["engine"], metrics["naive"]
    result["metrics_equal"] = metrics["engine"] == metrics["naive"]
    result["max_abs_delta_diff"] = float((deltas["engine"] - deltas["naive"]).abs().max())
    result["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(model.device),
    }
    # the contract: the last printed line is the JSON object; keep the four headline keys first
    ordered = {
        k: result[k] for k in ("seconds_per_edit_engine", "seconds_per_edit_naive", "ratio", "metrics_equal")
    }
    ordered.update({k: v for k, v in result.items() if k not in ordered})
    return ordered
