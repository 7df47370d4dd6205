"""What a long stream costs: memory and serving overhead of the edited layer as edits accumulate.

For each T, the state the edited layer serves after T edits is built with the real shapes (the real model, the
layout's real number of memories, keys, columns and subject tokens of real lengths; the side memories' values
are random, which changes no cost) and measured:

- **bytes**: everything the layer holds to route and answer (side memories, routing table, projection), and as
  a fraction of the model's parameter bytes;
- **routing overhead** at prefill (8 prompts of 32 tokens) and at decode (32 sequences, one token each, their
  route held from the prefill): the routed model's forward time over the same forward with routing off, median
  of ``repeats``, measured in one run.

The keyed layout (the default) is measured up to 100,000 edits; the shards layout (one dense memory per
``save_freq`` edits) as far as its memories fit, its bytes computed beyond. Retention beside the cost comes
from the quality benchmark's results at the same T, where they exist.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from orchestrator.config import JobConfig
from orchestrator.model_store import load_model
from wise.config import WiseConfig
from wise.keyed.names import name_flags
from wise.keyed.router import KeyedLinear
from wise.keyed.trainer import relation_projection
from wise.layout import resolve_layout
from wise.memory import Memory
from wise.publish import ServingSnapshot
from wise.router import RoutedLinear

logger = logging.getLogger(__name__)

DEFAULT_TS = (100, 1000, 10_000, 100_000)
PREFILL = (8, 32)  # sequences x tokens
DECODE = 32  # sequences, one token each


def _model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def keyed_memories(
    wise: WiseConfig, shape: tuple[int, int], t: int, subjects: Sequence[list[list[int]]], seed: int = 0
) -> list[Memory]:
    """The keyed layout's blocks after ``t`` edits, with random values of the real shapes; the edits' subjects
    cycle through ``subjects`` (real token variants), so real queries route."""
    gen = torch.Generator().manual_seed(seed)
    k, r, per = wise.keyed.columns, wise.keyed.relation_dim, wise.keyed.block_edits
    mems = []
    for j in range(math.ceil(t / per)):
        n = min(per, t - j * per)
        mems.append(
            Memory(
                torch.randn(shape, generator=gen) * 0.01,
                edit_ids=[f"s{j * per + i}" for i in range(n)],
                prompts=[f"synthetic prompt {j * per + i}" for i in range(n)],
                targets=["x"] * n,
                shard_ids=[j],
                columns=torch.stack([torch.randperm(shape[1], generator=gen)[:k] for _ in range(n)]),
                relkeys=torch.nn.functional.normalize(torch.randn(n, r, generator=gen), dim=-1).half(),
                subjects=[subjects[(j * per + i) % len(subjects)] for i in range(n)],
                values=torch.randn(n, shape[0], generator=gen).half() if wise.keyed.values else None,
            )
        )
    return mems


def _paired(routed_fn, main_fn, repeats: int) -> tuple[float, float, float]:
    """Time ``routed_fn`` and ``main_fn`` alternately ``repeats`` times (after a warm-up of each): the median
    of the per-pair ratios, then the two median times. Alternating keeps a machine's drift out of the ratio."""
    routed_fn(), main_fn()
    ratios, routed, main = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        routed_fn()
        t1 = time.perf_counter()
        main_fn()
        t2 = time.perf_counter()
        routed.append(t1 - t0)
        main.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios), statistics.median(routed), statistics.median(main)


@torch.no_grad()
def routing_overhead(model, routed, prompts: list[list[int]], pad_id: int, repeats: int) -> dict[str, float]:
    """Routed forward time over main-only forward time, minus one, at prefill and at decode (held route)."""
    b, t = PREFILL
    ids = torch.tensor([(p * t)[:t] for p in prompts[:b]])
    span = torch.ones_like(ids, dtype=torch.bool)

    def prefill() -> None:
        with routed.query_span(span):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def prefill_main() -> None:
        with routed.main_only():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    dec_ids = torch.tensor([(prompts[i % len(prompts)] * t)[:t] for i in range(DECODE)])
    dec_span = torch.ones_like(dec_ids, dtype=torch.bool)
    step = torch.full((DECODE, 1), pad_id)
    with routed.hold_route():
        with routed.query_span(dec_span):
            past = model(input_ids=dec_ids, use_cache=True, logits_to_keep=1).past_key_values
        length = past.get_seq_length()
        with routed.main_only():
            past_main = model(input_ids=dec_ids, use_cache=True, logits_to_keep=1).past_key_values

        def decode() -> None:
            past.crop(length)
            model(input_ids=step, past_key_values=past, use_cache=True, logits_to_keep=1)

        def decode_main() -> None:
            past_main.crop(length)
            with routed.main_only():
                model(input_ids=step, past_key_values=past_main, use_cache=True, logits_to_keep=1)

        dec_ratio, dec_routed, dec_main = _paired(decode, decode_main, repeats)
    pre_ratio, pre_routed, pre_main = _paired(prefill, prefill_main, repeats)
    return {
        "prefill": pre_ratio - 1.0,
        "decode": dec_ratio - 1.0,
        "prefill_seconds": pre_routed,
        "decode_seconds": dec_routed,
        "prefill_main_seconds": pre_main,
        "decode_main_seconds": dec_main,
    }


def _retention(results: Path, method: str, t: int) -> dict[str, Any] | None:
    out = {}
    for dataset in ("zsre", "counterfact"):
        files = sorted(
            (results / "quality" / dataset / method).glob("T*.json"), key=lambda p: int(p.stem[1:])
        )
        best = [f for f in files if int(f.stem[1:]) <= t and int(f.stem[1:]) >= 0.9 * t]
        if best:
            r = json.loads(best[-1].read_text())
            out[dataset] = {"T": r["T"], **r["teacher_forced"], "generate": r.get("generate")}
    return out or None


def scale_benchmark(
    cfg: JobConfig,
    ts: Sequence[int] = DEFAULT_TS,
    repeats: int = 5,
    shards_cfg: JobConfig | None = None,
    results: str | Path = "benchmarks/results",
    max_shard_memories: int = 500,
) -> dict[str, Any]:
    """Memory and routing overhead per T for ``cfg``'s keyed layout (and ``shards_cfg``'s shards layout).

    Args:
        cfg: a job config with ``wise.layout: keyed`` (its stream's prompts are the timed queries).
        ts: the edit counts to measure.
        repeats: timed forwards per measurement (the median is kept).
        shards_cfg: a job config with ``wise.layout: shards`` to compare with (None: keyed only).
        results: where the quality benchmark's results are (retention beside the cost).
        max_shard_memories: the most dense shard memories built; beyond, their bytes are computed, not timed.

    Returns:
        ``{"model_bytes", "rows": [{"layout", "T", "bytes", "percent_of_model", "bytes_per_edit",
        "overhead": {...}, "retention": {...}}]}``.
    """
    from streams import EditStream, open_source

    if cfg.wise.layout != "keyed":
        raise ValueError(
            "bench scale measures a keyed config (wise.layout: keyed); pass the shards one as --compare"
        )
    model, tokenizer = load_model(cfg)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_bytes = _model_bytes(model)
    lay = resolve_layout(model, cfg.wise.layer, cfg.wise.module)
    shape = tuple(lay.module.weight.shape)
    records = [r for _, r in EditStream(open_source(cfg.stream.path, cfg.stream.format), max_records=64)]
    prompts = [list(tokenizer(r.prompt).input_ids) for r in records]
    subjects = [
        [
            list(tokenizer(" " + r.subject, add_special_tokens=False).input_ids),
            list(tokenizer(r.subject, add_special_tokens=False).input_ids),
        ]
        for r in records
        if r.subject
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # the quality benchmark's method with these settings: retention beside the cost
    method = "keyed-values" if cfg.wise.keyed.values else "keyed"
    rows = []

    keyed = KeyedLinear(lay.module)
    model.set_submodule(lay.module_path, keyed)
    hooks = keyed.attach(model)
    projection = relation_projection(shape[1], cfg.wise.keyed.relation_dim, cfg.wise.seed)
    flags = name_flags(tokenizer) if cfg.wise.keyed.whole_names else None
    try:
        for t in ts:
            mems = keyed_memories(cfg.wise, shape, t, subjects)
            snap = ServingSnapshot.keyed(
                lay.module_path, mems, projection, torch.zeros(projection.shape[1]), name_flags=flags
            )
            nbytes = sum(snap.nbytes().values())
            keyed.set_memories(mems, projection, None, name_flags=flags)
            overhead = routing_overhead(model, keyed, prompts, pad, repeats)
            rows.append(_row("keyed", t, nbytes, model_bytes, overhead, _retention(Path(results), method, t)))
            logger.info("keyed T=%d: %s", t, rows[-1])
            del mems, snap
            keyed.set_memories([], projection, None)
    finally:
        for hook in hooks:
            hook.remove()
        model.set_submodule(lay.module_path, lay.module)
    if shards_cfg is not None:
        rows += _shards_rows(
            shards_cfg.wise,
            model,
            lay,
            shape,
            prompts,
            pad,
            ts,
            repeats,
            model_bytes,
            results,
            max_shard_memories,
        )
    return {
        "model_bytes": model_bytes,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "prefill": {"sequences": PREFILL[0], "tokens": PREFILL[1]},
        "decode": {"sequences": DECODE},
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def _row(
    layout: str, t: int, nbytes: int, model_bytes: int, overhead: dict | None, retention
) -> dict[str, Any]:
    return {
        "layout": layout,
        "T": t,
        "bytes": nbytes,
        "percent_of_model": 100.0 * nbytes / model_bytes,
        "bytes_per_edit": nbytes / t,
        "overhead": overhead,
        "retention": retention,
    }


def _shards_rows(
    wise, model, lay, shape, prompts, pad, ts, repeats, model_bytes, results, max_memories
) -> list[dict]:
    """The shards layout: one dense memory (and a threshold) per ``save_freq`` edits, WISE-Retrieve."""
    rows = []
    routed = RoutedLinear(lay.module, reduce=wise.router_reduce)
    model.set_submodule(lay.module_path, routed)
    per = shape[0] * shape[1] * lay.module.weight.element_size() + 4
    try:
        for t in ts:
            k = math.ceil(t / wise.save_freq)
            overhead = None
            if k <= max_memories:
                gen = torch.Generator().manual_seed(0)
                routed.set_memories(torch.randn((k, *shape), generator=gen) * 0.01, torch.ones(k))
                overhead = routing_overhead(model, routed, prompts, pad, repeats)
                routed.set_memories(routed.deltas[:0], torch.zeros(0))
            rows.append(
                _row(
                    "shards", t, k * per, model_bytes, overhead, _retention(Path(results), "wise-retrieve", t)
                )
            )
            logger.info("shards T=%d: %s", t, rows[-1])
    finally:
        model.set_submodule(lay.module_path, lay.module)
    return rows


__all__ = ["DEFAULT_TS", "keyed_memories", "routing_overhead", "scale_benchmark"]
