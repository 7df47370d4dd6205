"""Retention metrics exactly as the knowledge-editing literature computes them.

- reliability / generalization: teacher-forced token accuracy of the target after the edit prompt / its
  rephrase (the fraction of target tokens that are the argmax given the gold prefix), per edit, averaged;
- locality: fraction of the locality answer's tokens whose argmax is unchanged from the pre-edit model (the
  main memory alone, which WISE never changes);
- free-generation variants: greedy continuation of the prompt contains the target (teacher forcing overstates
  success; arXiv 2502.11177).
Routing decisions use the prompt's tokens as the query span, as a serving engine sees the question.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wise.batch import IGNORE, Tokens
from wise.router import RoutedLinear
from wise.state import atomic_write

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenPredictions:
    """Per row: argmax ids at the answer-predicting positions, the gold answer ids, and the route taken."""

    predicted: list[torch.Tensor]
    gold: list[torch.Tensor]
    route: torch.Tensor  # (N,) memory index per row, -1 = main memory
    ratio: torch.Tensor  # (N,) best routing score / threshold per row (>= 1 routes to a side memory)


@torch.no_grad()
def answer_predictions(
    model: nn.Module,
    routed: RoutedLinear,
    tokens: Tokens,
    pairs: Sequence[tuple[str, str]],
    *,
    main_only: bool = False,
    batch_size: int = 16,
) -> TokenPredictions:
    """Teacher-forced argmax predictions over each answer, given ``prompt + answer``.

    Args:
        model: the (edited) model.
        routed: its routed layer.
        tokens: tokenisation conventions.
        pairs: ``(prompt, answer)`` pairs.
        main_only: answer from the main memory only (the pre-edit model).
        batch_size: rows per forward pass.

    Returns:
        :class:`TokenPredictions`.
    """
    device = routed.weight.device
    predicted, gold, routes, ratios = [], [], [], []
    for i in range(0, len(pairs), batch_size):
        rows = [tokens.row(p, a) for p, a in pairs[i : i + batch_size]]
        batch = tokens.collate(rows).to(device)
        ctx = routed.main_only() if main_only else routed.query_span(batch.span)
        with ctx:
            logits = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).logits
        routes.append(routed.last_choice.cpu())
        ratios.append(routed.last_ratio.float().cpu())
        argmax = logits.argmax(-1)  # (B, T)
        for r in range(len(rows)):
            where = batch.labels[r] != IGNORE
            predicted.append(argmax[r][where].cpu())
            gold.append(batch.labels[r][where].cpu())
    empty = torch.zeros(0)
    return TokenPredictions(
        predicted,
        gold,
        torch.cat(routes) if routes else empty.long(),
        torch.cat(ratios) if ratios else empty,
    )


def token_accuracy(preds: TokenPredictions) -> list[float]:
    """Per-row teacher-forced token accuracy."""
    return [float((p == g).float().mean()) for p, g in zip(preds.predicted, preds.gold, strict=True)]


def agreement(after: TokenPredictions, before: TokenPredictions) -> list[float]:
    """Per-row fraction of positions whose argmax is unchanged (locality)."""
    return [float((a == b).float().mean()) for a, b in zip(after.predicted, before.predicted, strict=True)]


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    routed: RoutedLinear,
    tokens: Tokens,
    prompt: str,
    max_new_tokens: int,
    *,
    main_only: bool = False,
) -> str:
    """Greedy continuation of ``prompt``; the route is the prompt's (decided on its tokens at prefill).

    A router that can hold its route (``hold_route``, as :class:`RoutedLinear`) decides it at the prefill and
    keeps it for the decode steps, which then use a KV cache; so does the main memory alone. A router without
    it (the baselines) sees the whole sequence again at every step, with the prompt as its query span, so it
    decides on the prompt every time. Either way the decision is the one a serving engine takes at prefill.
    """
    device = routed.weight.device
    prompt_ids = list(tokens.prompt(prompt))
    ids = list(prompt_ids)
    eos = tokens.tokenizer.eos_token_id
    hold = getattr(routed, "hold_route", None)
    if main_only or hold is not None:
        span = torch.ones((1, len(prompt_ids)), dtype=torch.bool, device=device)
        with routed.main_only() if main_only else hold():
            inp, past = torch.tensor([ids], device=device), None
            for _ in range(max_new_tokens):
                with routed.query_span(span if past is None else None):
                    out = model(input_ids=inp, past_key_values=past, use_cache=True, logits_to_keep=1)
                nxt = int(out.logits[0, -1].argmax())
                if nxt == eos:
                    break
                ids.append(nxt)
                inp, past = torch.tensor([[nxt]], device=device), out.past_key_values
        return tokens.tokenizer.decode(ids[len(prompt_ids) :], skip_special_tokens=True)
    for _ in range(max_new_tokens):
        inp = torch.tensor([ids], device=device)
        span = torch.zeros_like(inp, dtype=torch.bool)
        span[0, : len(prompt_ids)] = True
        with routed.query_span(span):
            nxt = int(model(input_ids=inp, use_cache=False, logits_to_keep=1).logits[0, -1].argmax())
        if nxt == eos:
            break
        ids.append(nxt)
    return tokens.tokenizer.decode(ids[len(prompt_ids) :], skip_special_tokens=True)


@torch.no_grad()
def greedy_generate_batch(
    model: nn.Module,
    routed: RoutedLinear,
    tokens: Tokens,
    prompts: Sequence[str],
    max_new_tokens: Sequence[int],
    *,
    main_only: bool = False,
) -> list[str]:
    """:func:`greedy_generate` of several prompts at once (a router that holds its route, or the main memory
    alone): the prompts are left-padded into one prefill, each routed on its own prompt tokens, and decoded
    together with a KV cache; prompt ``i`` gets at most ``max_new_tokens[i]`` tokens and stops at EOS."""
    if len(prompts) != len(max_new_tokens):
        raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} token budgets")
    if not prompts:
        return []
    device = routed.weight.device
    eos = tokens.tokenizer.eos_token_id
    ids = [list(tokens.prompt(p)) for p in prompts]
    b, width = len(ids), max(len(x) for x in ids)
    inp = torch.full((b, width), tokens.pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for r, x in enumerate(ids):
        inp[r, width - len(x) :] = torch.tensor(x)
        mask[r, width - len(x) :] = 1
    span = mask.bool().to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    new: list[list[int]] = [[] for _ in prompts]
    live = [n > 0 for n in max_new_tokens]
    past = None
    with routed.main_only() if main_only else routed.hold_route():
        while any(live):
            with routed.query_span(span if past is None else None):
                out = model(
                    input_ids=inp.to(device),
                    attention_mask=mask.to(device),
                    position_ids=pos.to(device),
                    past_key_values=past,
                    use_cache=True,
                    logits_to_keep=1,
                )
            nxt = out.logits[:, -1].argmax(-1).cpu()
            for r in range(b):
                if live[r]:
                    if int(nxt[r]) == eos:
                        live[r] = False
                    else:
                        new[r].append(int(nxt[r]))
                        live[r] = len(new[r]) < max_new_tokens[r]
            past, inp = out.past_key_values, nxt.unsqueeze(1)
            mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], 1)
            pos = pos[:, -1:] + 1
    return [tokens.tokenizer.decode(x, skip_special_tokens=True) for x in new]


def generation_hits(
    model: nn.Module,
    routed: RoutedLinear,
    tokens: Tokens,
    pairs: Sequence[tuple[str, str]],
    *,
    main_only: bool = False,
    extra_tokens: int = 4,
    batch_size: int = 16,
) -> list[float]:
    """Per pair: 1.0 if the greedy continuation of the prompt contains the target (case-insensitive). Prompts
    are generated ``batch_size`` at a time when the router holds its route (or for the main memory alone)."""
    budgets = [len(tokens.answer(target)) + extra_tokens for _, target in pairs]
    if main_only or getattr(routed, "hold_route", None) is not None:
        texts: list[str] = []
        for i in range(0, len(pairs), batch_size):
            chunk = [p for p, _ in pairs[i : i + batch_size]]
            texts += greedy_generate_batch(
                model, routed, tokens, chunk, budgets[i : i + batch_size], main_only=main_only
            )
    else:
        texts = [
            greedy_generate(model, routed, tokens, p, n, main_only=main_only)
            for (p, _), n in zip(pairs, budgets, strict=True)
        ]
    return [float(t.strip().lower() in text.lower()) for (_, t), text in zip(pairs, texts, strict=True)]


def _quantiles(x: torch.Tensor) -> dict[str, float] | None:
    """min / median / max of routing score over threshold: where queries sit relative to the router's cut."""
    if not x.numel():
        return None
    return {"min": float(x.min()), "median": float(x.median()), "max": float(x.max())}


def mean(values: Sequence[float]) -> float | None:
    """Average, or None for an empty list (a metric with nothing to measure is not 0)."""
    return float(sum(values) / len(values)) if values else None


def _pairs(records, field: str) -> tuple[list[tuple[str, str]], list[int]]:
    out, owner = [], []
    for i, r in enumerate(records):
        if field == "prompt":
            out.append((r.prompt, r.target))
            owner.append(i)
        elif field == "rephrase":
            for q in getattr(r, "rephrase", ()) or ():
                out.append((q, r.target))
                owner.append(i)
        elif field == "locality":
            lp, la = getattr(r, "locality_prompt", None), getattr(r, "locality_answer", None)
            if lp and la:
                out.append((lp, la))
                owner.append(i)
    return out, owner


def probe_records(
    model: nn.Module,
    routed: RoutedLinear,
    tokens: Tokens,
    records: Sequence,
    *,
    main_only: bool = False,
    generate: bool = True,
    progress: bool = False,
) -> dict:
    """Every probe's outcome over ``records``, as plain lists (JSON-serialisable; :func:`summarize_probes`
    turns them into metrics, :func:`concat_probes` joins the probes of consecutive slices of records).

    Returns:
        ``{"records": n, "rel": [acc], "gen": [acc], "gen_owner": [record index], "loc": [agreement],
        "loc_owner": [...], "route": {edit, rephrase, locality: [memory index, -1 = main]}, "ratio": {...:
        [score / threshold]}}`` plus ``"rel_hit"`` / ``"gen_hit"`` (free generation) when ``generate``.
    """
    rel_pairs, _ = _pairs(records, "prompt")
    gen_pairs, gen_owner = _pairs(records, "rephrase")
    loc_pairs, loc_owner = _pairs(records, "locality")
    level = logging.INFO if progress else logging.DEBUG
    model_name = "pre-edit model" if main_only else "edited model"

    def timed(name: str, pairs: Sequence, fn: Callable, **kw):
        t0 = time.perf_counter()
        res = fn(model, routed, tokens, pairs, **kw)
        logger.log(
            level,
            "%s, %d records: %s, %d probes, %.1f s",
            model_name,
            len(records),
            name,
            len(pairs),
            time.perf_counter() - t0,
        )
        return res

    rel = timed("reliability (teacher-forced)", rel_pairs, answer_predictions, main_only=main_only)
    gen = timed("generalization (teacher-forced)", gen_pairs, answer_predictions, main_only=main_only)
    loc = timed("locality (teacher-forced)", loc_pairs, answer_predictions, main_only=main_only)
    # the pre-edit reference is the main memory alone: when that is what we measure, it is the same pass
    loc_ref = loc if main_only else timed("locality reference", loc_pairs, answer_predictions, main_only=True)
    kinds = (("edit", rel), ("rephrase", gen), ("locality", loc))
    out = {
        "records": len(records),
        "rel": token_accuracy(rel),
        "gen": token_accuracy(gen),
        "gen_owner": gen_owner,
        "loc": agreement(loc, loc_ref),
        "loc_owner": loc_owner,
        "route": {name: [int(c) for c in p.route.tolist()] for name, p in kinds},
        "ratio": {name: [float(x) for x in p.ratio.tolist()] for name, p in kinds},
    }
    if generate:
        out["rel_hit"] = timed("reliability (generation)", rel_pairs, generation_hits, main_only=main_only)
        out["gen_hit"] = timed("generalization (generation)", gen_pairs, generation_hits, main_only=main_only)
    return out


def concat_probes(parts: Sequence[dict]) -> dict:
    """The probes of consecutive slices of records (each from :func:`probe_records`) as one."""
    out: dict = {"records": 0, "rel": [], "gen": [], "gen_owner": [], "loc": [], "loc_owner": []}
    out["route"] = {k: [] for k in ("edit", "rephrase", "locality")}
    out["ratio"] = {k: [] for k in ("edit", "rephrase", "locality")}
    generate = all("rel_hit" in p for p in parts)
    if generate:
        out["rel_hit"], out["gen_hit"] = [], []
    for p in parts:
        base = out["records"]
        out["records"] += p["records"]
        for k in ("rel", "gen", "loc") + (("rel_hit", "gen_hit") if generate else ()):
            out[k] += p[k]
        out["gen_owner"] += [base + o for o in p["gen_owner"]]
        out["loc_owner"] += [base + o for o in p["loc_owner"]]
        for k in out["route"]:
            out["route"][k] += p["route"][k]
            out["ratio"][k] += p["ratio"][k]
    return out


def summarize_probes(probes: dict, records: Sequence) -> dict:
    """Metrics from :func:`probe_records`' outcomes over the same ``records`` (see :func:`evaluate_records`)."""
    out = {
        "teacher_forced": {
            "reliability": mean(probes["rel"]),
            "generalization": mean(probes["gen"]),
            "locality": mean(probes["loc"]),
        },
        "routed_fraction": {k: mean([float(c >= 0) for c in v]) for k, v in probes["route"].items()},
        "score_over_threshold": {k: _quantiles(torch.tensor(v)) for k, v in probes["ratio"].items()},
    }
    generate = "rel_hit" in probes
    if generate:
        out["generate"] = {"reliability": mean(probes["rel_hit"]), "generalization": mean(probes["gen_hit"])}
    gen_by, loc_by = _by_owner(probes, "gen", len(records)), _by_owner(probes, "loc", len(records))
    hit_by = _by_owner(probes, "gen_hit", len(records), owner="gen_owner") if generate else None
    per_edit = []
    for i, r in enumerate(records):
        item = {"id": r.id, "reliability": probes["rel"][i], "routed": probes["route"]["edit"][i] >= 0}
        item["generalization"] = mean(gen_by[i])
        item["locality"] = mean(loc_by[i])
        if hit_by is not None:
            item["generate_reliability"] = probes["rel_hit"][i]
            item["generate_generalization"] = mean(hit_by[i])
        per_edit.append(item)
    out["per_edit"] = per_edit
    return out


def _by_owner(probes: dict, key: str, n: int, owner: str | None = None) -> list[list[float]]:
    by: list[list[float]] = [[] for _ in range(n)]
    for value, o in zip(probes[key], probes[owner or f"{key}_owner"], strict=True):
        by[o].append(value)
    return by


def evaluate_records(
    model: nn.Module,
    routed: RoutedLinear,
    tokens: Tokens,
    records: Sequence,
    *,
    main_only: bool = False,
    generate: bool = True,
    progress: bool = False,
    cache: str | Path | None = None,
    chunk: int = 250,
) -> dict:
    """Retention over ``records`` (each with prompt/target and optional rephrase and locality fields).

    Args:
        model, routed, tokens: the model under test.
        records: edit records (``streams.EditRecord`` or anything with the same attributes).
        main_only: measure the pre-edit model (main memory only).
        generate: also compute the free-generation variants.
        progress: log each pass (probes, seconds) at INFO instead of DEBUG, for long evaluations.
        cache: a directory where the probes of each ``chunk`` records are kept as they finish (named by the
            slice's position and record ids), so that a long evaluation stopped part-way resumes there; one
            directory per model state and ``main_only``, which the caller deletes when the model changes.
        chunk: records per cached slice.

    Returns:
        ``{"teacher_forced": {reliability, generalization, locality}, "generate": {reliability,
        generalization}, "routed_fraction": {edit, rephrase, locality}, "per_edit": [...]}``; a metric with no
        probes is None.
    """
    kw = {"main_only": main_only, "generate": generate, "progress": progress}
    if cache is None:
        return summarize_probes(probe_records(model, routed, tokens, records, **kw), records)
    return summarize_probes(
        cached_probes(model, routed, tokens, records, cache=cache, chunk=chunk, **kw), records
    )


def cached_probes(
    model: nn.Module,
    routed: RoutedLinear,
    tokens: Tokens,
    records: Sequence,
    *,
    cache: str | Path,
    main_only: bool = False,
    generate: bool = True,
    progress: bool = False,
    chunk: int = 250,
) -> dict:
    """:func:`probe_records` over ``records``, ``chunk`` records at a time, each slice kept under ``cache`` as it
    finishes and read back instead of measured when it is there (see :func:`evaluate_records`).

    Returns:
        The probes of all ``records``, as :func:`concat_probes` joins them.
    """
    kw = {"main_only": main_only, "generate": generate, "progress": progress}
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    parts = []
    n_chunks = -(-len(records) // chunk)
    for k, start in enumerate(range(0, len(records), chunk)):
        part = records[start : start + chunk]
        ids = hashlib.sha1("\n".join(str(r.id) for r in part).encode()).hexdigest()[:12]
        path = cache / f"{start}-{start + len(part)}-{ids}{'-gen' if generate else ''}.json"
        if path.exists():
            parts.append(json.loads(path.read_text()))
            continue
        t0 = time.perf_counter()
        probes = probe_records(model, routed, tokens, part, **kw)
        atomic_write(path, lambda tmp, probes=probes: Path(tmp).write_text(json.dumps(probes)))
        parts.append(probes)
        logger.log(
            logging.INFO if progress else logging.DEBUG,
            "records %d-%d of %d measured (slice %d/%d, %.0f s), kept in %s",
            start,
            start + len(part),
            len(records),
            k + 1,
            n_chunks,
            time.perf_counter() - t0,
            cache,
        )
    return concat_probes(parts)
