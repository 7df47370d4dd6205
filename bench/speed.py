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
from orchestrator.inputs import irrelevant_pool, stream_sample
from orchestrator.model_store import load_model
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
    records = stream_sample(cfg, n_edits, "the speed benchmark")
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
        editor.prepare()  # templates, margins and pool activations outside the timed region, same for both
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
    # equal metrics say little when every metric sits at 0 or 1: the report says which case this was
    result["metrics_saturated"] = all(
        v in (0.0, 1.0) for v in metrics["engine"]["teacher_forced"].values() if v is not None
    )
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


@torch.no_grad()
def layer_scan(cfg: JobConfig, n_records: int = 60) -> dict[str, Any]:
    """Which layer's MLP-output input best tells an edit's own rephrase from unrelated prompts?

    For every block, take the input of the MLP output projection, averaged over the prompt's tokens (the
    router's ``mean`` statistic) and at the last token (``last``), centred on the irrelevant pool's mean. For
    each edit record, count a hit when its rephrase is closer (cosine) to the edit prompt than every locality
    prompt (of all records) and every pool prompt. A layer with a high hit rate gives the router a statistic
    that can separate in-scope from out-of-scope queries.

    Returns:
        ``{"mean": [...per layer...], "last": [...], "best_mean_layer": int}`` hit rates.
    """
    from wise.layout import resolve_layout

    if cfg.stream.path is None:
        raise ValueError("the layer scan reads its records from stream.path")
    records = [
        r
        for _, r in EditStream(open_source(cfg.stream.path, cfg.stream.format), max_records=n_records)
        if r.rephrase and r.locality_prompt
    ]
    pool = [p for p, _ in irrelevant_pool(cfg)[:n_records]]
    model, tokenizer = load_model(cfg)
    n_layers = len(resolve_layout(model, 0).blocks)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for i in range(n_layers):
        module = resolve_layout(model, i).module
        hooks.append(module.register_forward_pre_hook(lambda _m, a, i=i: captured.__setitem__(i, a[0][0])))

    def feats(text: str) -> dict[str, torch.Tensor]:
        ids = tokenizer(text, return_tensors="pt").to(model.device)
        model(**ids, use_cache=False, logits_to_keep=1)
        return {
            "mean": torch.stack([captured[i].float().mean(0) for i in range(n_layers)]),  # (L, d_in)
            "last": torch.stack([captured[i][-1].float() for i in range(n_layers)]),
        }

    try:
        edit = [feats(r.prompt) for r in records]
        reph = [feats(r.rephrase[0]) for r in records]
        unrelated = [feats(r.locality_prompt) for r in records] + [feats(p) for p in pool]
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, Any] = {"records": len(records), "pool": len(pool)}
    for how in ("mean", "last"):
        pool_center = torch.stack([u[how] for u in unrelated[len(records) :]]).mean(0)  # (L, d_in)

        def unit(x: torch.Tensor, c=pool_center) -> torch.Tensor:
            return torch.nn.functional.normalize(x - c, dim=-1)

        e = torch.stack([unit(f[how]) for f in edit])  # (N, L, d)
        r = torch.stack([unit(f[how]) for f in reph])
        u = torch.stack([unit(f[how]) for f in unrelated])  # (M, L, d)
        own = (e * r).sum(-1)  # (N, L)
        rival = torch.einsum("nld,mld->nml", e, u).amax(1)  # (N, L): closest unrelated prompt
        out[how] = [round(float(x), 3) for x in (own > rival).float().mean(0)]
    upper = range(n_layers // 2, n_layers)
    out["best_mean_layer_upper_half"] = max(upper, key=lambda i: out["mean"][i])
    return out
