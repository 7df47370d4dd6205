"""Can a relation key tell a reworded question from another question about the same subject? (``wisestream bench
relations``; config ``configs/bench/relations.yaml``). Development split only: nothing here reads a test record.

The keyed layout routes a query that names an edited subject to that subject's edit; the relation gate
(``wise.keyed.min_similarity``) may refuse it when its relation key is far from the edit's. The gate can only
work if rephrases (which should get the edit: generalization) score above other relations of the subject (which
should not: locality). This benchmark measures that separation for several keys, all computed on the unedited
model, so no edit is needed:

- ``router``: the router's own key (:func:`wise.keyed.table.route`): the mean input of the edited projection over
  the prompt's tokens besides the subject, projected and centred on the irrelevant pool;
- ``sentence``: the same mean from the start of the subject's sentence (drops a context sentence before it);
- ``last``: the edited projection's input at the prompt's last token, projected and centred;
- ``residual_last``: the residual stream entering the edited layer at the last token, centred;
- ``residual_projected``: the same, projected to ``keyed.relation_dim`` dimensions as the router stores its keys
  (a fixed Gaussian projection, :func:`wise.keyed.trainer.relation_projection`) and centred;
- ``answer``: the unedited model's next-token distribution after the prompt (cosine of probabilities); not a
  key the router can compute in one pass, it bounds what "what is being asked" separates.

Pairs: every development record's edit prompt with each of its rephrases (positives), and each same-subject
development edit's prompt with its locality prompt, another relation of that subject (negatives). Per key: the
AUC (share of positive-negative pairs ordered right), and for thresholds that keep a share of the rephrases, the
share of other-relation probes they refuse. ``answer_disjoint`` is the share of rephrases whose unedited
next-token distribution shares almost nothing with their edit prompt's (cosine below 0.05), with examples.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from bench.milestones import write_json
from bench.quality import DatasetSpec, dataset_records, keyed_method, load_spec
from wise.config import FrozenConfig
from wise.keyed.table import relation_vectors, subject_positions
from wise.keyed.trainer import relation_projection

logger = logging.getLogger(__name__)

KEYS = ("router", "sentence", "last", "residual_last", "residual_projected", "answer")
DISJOINT = 0.05  # answer cosine below which a rephrase counts as asking something else


class RelationsSpec(FrozenConfig):
    """Where the separation is measured."""

    quality: str = Field("configs/bench/quality.yaml", description="the quality benchmark: model and methods")
    output: str = Field("benchmarks/results/relations.json", description="the result (committed)")
    method: str = Field(
        "keyed-values", description="the keyed method whose layer, projection and pool are used"
    )
    dev: DatasetSpec = Field(description="development edits: edit prompt and rephrases (never reported)")
    dev_limit: int = Field(1000, ge=1, description="use the first this many development records")
    other: DatasetSpec = Field(description="same-subject edits: each locality prompt asks another relation")
    keep: tuple[float, ...] = Field((0.99, 0.98, 0.95), description="shares of rephrases a threshold keeps")
    examples: int = Field(12, ge=0, description="answer-disjoint rephrases quoted in the result")


def load_relations_config(path: str | Path) -> RelationsSpec:
    """Load ``configs/bench/relations.yaml``.

    Raises:
        ConfigError: unknown keys or bad values, with the key path.
    """
    return load_spec(RelationsSpec, path)


def separation(pos: Sequence[float], neg: Sequence[float], keep: Sequence[float]) -> dict[str, Any]:
    """How well scores ``pos`` (should pass) stand above ``neg`` (should be refused): ``auc`` (ties count half)
    and, per share ``q`` of ``keep``, the threshold that keeps at least ``q`` of ``pos`` (the lower
    ``q``-quantile) and the share of ``neg`` strictly below it."""
    if not pos or not neg:
        raise ValueError("separation needs positive and negative scores")
    p = torch.tensor(pos, dtype=torch.float64)
    n = torch.tensor(neg, dtype=torch.float64)
    diff = p.unsqueeze(1) - n.unsqueeze(0)
    auc = float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    ordered = p.sort().values
    rows = []
    for q in keep:
        k = min(len(pos) - 1, max(0, math.floor((1.0 - q) * len(pos))))
        t = float(ordered[k])
        rows.append(
            {
                "keep": q,
                "threshold": t,
                "kept": float((p >= t).double().mean()),
                "refused": float((n < t).double().mean()),
            }
        )
    return {"auc": auc, "thresholds": rows}


def sentence_start(ids: Sequence[int], before: int, ends: set[int]) -> int:
    """Index of the first token of the sentence holding position ``before``: one past the last token before it
    that ends a sentence (``ends``: ids whose text ends with ``.``, ``?`` or ``!``), 0 when none does."""
    start = 0
    for i in range(min(before, len(ids))):
        if ids[i] in ends:
            start = i + 1
    return start


class KeyProbe:
    """The relation keys of prompts, on the unedited model behind a keyed trainer (its tokens, layer,
    projection and pool centre)."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.model = trainer.model
        tok = trainer.tokens.tokenizer
        self.ends = {i for i in range(len(tok)) if tok.decode([i]).strip()[-1:] in (".", "?", "!")}
        self.layer = int(trainer.cfg.layer)
        trainer.ensure_ready()
        hidden = self.model.get_input_embeddings().embedding_dim
        r, seed = trainer.cfg.keyed.relation_dim, trainer.cfg.seed
        mean = relation_projection(trainer.routed.d_in, r, seed).to(trainer.device)  # the mean key's
        residual = relation_projection(hidden, r, seed).to(trainer.device)
        self.projection = {"router": mean, "sentence": mean, "last": mean, "residual_projected": residual}
        self.center: dict[str, torch.Tensor] = {}
        pool = [self.raw(p, []) for p, _ in trainer.irrelevant]
        for k in KEYS:
            if pool and k != "answer":
                stack = torch.stack([r[k] for r in pool])
                self.center[k] = (stack @ self.projection[k] if k in self.projection else stack).mean(0)

    @torch.no_grad()
    def raw(self, prompt: str, variants: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Uncentred vectors of every key for ``prompt`` whose subject has token ``variants``."""
        tr = self.trainer
        ids = list(tr.tokens.prompt(prompt))
        captured: dict[str, torch.Tensor] = {}
        hook = tr.routed.register_forward_pre_hook(lambda _m, args: captured.__setitem__("a", args[0]))
        try:
            with tr.routed.main_only():
                out = self.model(
                    input_ids=torch.tensor([ids], device=tr.device),
                    use_cache=False,
                    logits_to_keep=1,
                    output_hidden_states=True,
                )
        finally:
            hook.remove()
        a = captured["a"][0].float()
        n = len(ids)
        subject = set(subject_positions(ids, variants)) if variants else set()
        rest = [i for i in range(n) if i not in subject] or list(range(n))
        start = sentence_start(ids, min(subject) if subject else n, self.ends)
        sentence = [i for i in rest if i >= start] or rest
        return {
            "router": a[rest].mean(0),
            "sentence": a[sentence].mean(0),
            "last": a[n - 1],
            "residual_last": out.hidden_states[self.layer][0, -1].float(),
            "residual_projected": out.hidden_states[self.layer][0, -1].float(),
            "answer": torch.softmax(out.logits[0, -1].float(), -1),
        }

    def keys(self, prompt: str, variants: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Unit keys of every kind (the ``router`` one exactly as :func:`wise.keyed.table.route` computes it)."""
        raw = self.raw(prompt, variants)
        out = {}
        for k, v in raw.items():
            if k in self.projection:
                out[k] = relation_vectors(v.unsqueeze(0), self.projection[k], self.center.get(k))[0]
            elif k in self.center:
                out[k] = F.normalize(v - self.center[k], dim=0)
            else:
                out[k] = F.normalize(v, dim=0)
        return out


def measure(probe: KeyProbe, dev: Sequence, other: Sequence, keep: Sequence[float], examples: int) -> dict:
    """The result's body: pair counts, each key's :func:`separation`, and the answer-disjoint rephrases."""
    tr = probe.trainer
    pos: dict[str, list[float]] = {k: [] for k in KEYS}
    neg: dict[str, list[float]] = {k: [] for k in KEYS}
    pairs: list[tuple[float, str, str]] = []
    for i, rec in enumerate([*other, *dev]):
        variants = tr.subject_variants(rec)
        edit = probe.keys(rec.prompt, variants)
        for q in rec.rephrase:
            k = probe.keys(q, variants)
            for name in KEYS:
                pos[name].append(float(edit[name] @ k[name]))
            pairs.append((pos["answer"][-1], rec.prompt, q))
        if i < len(other) and rec.locality_prompt:
            k = probe.keys(rec.locality_prompt, variants)
            for name in KEYS:
                neg[name].append(float(edit[name] @ k[name]))
        if (i + 1) % 100 == 0:
            logger.info("relation keys: %d of %d records", i + 1, len(other) + len(dev))
    pairs.sort(key=lambda p: p[0])
    disjoint = [p for p in pairs if p[0] < DISJOINT]
    return {
        "rephrases": len(pos["answer"]),
        "other_relations": len(neg["answer"]),
        "keys": {k: separation(pos[k], neg[k], keep) for k in KEYS},
        "answer_disjoint": len(disjoint) / len(pairs) if pairs else None,
        "examples": [{"prompt": p, "rephrase": q, "answer_cosine": c} for c, p, q in disjoint[:examples]],
    }


def relations_benchmark(qcfg, spec: RelationsSpec, out: Path, command: str) -> dict[str, Any]:
    """Measure the separation of every key on the development records; write ``out``."""
    from bench.quality import machine
    from orchestrator.config import build_config
    from orchestrator.model_store import load_model
    from wise.factory import make_trainer

    settings, pool = keyed_method(qcfg, spec.method, "relations.method")
    model, tokenizer = load_model(build_config({"model": qcfg.model.model_dump()}))
    probe = KeyProbe(make_trainer(model, tokenizer, settings, pool))
    dev = dataset_records(spec.dev, spec.dev_limit)
    other = dataset_records(spec.other, 10**9)
    result = {
        **measure(probe, dev, other, spec.keep, spec.examples),
        "dev_records": len(dev),
        "other_records": len(other),
        "method": spec.method,
        "command": command,
        "machine": machine(),
    }
    write_json(out, result)
    return result


__all__ = [
    "KEYS",
    "KeyProbe",
    "RelationsSpec",
    "load_relations_config",
    "measure",
    "relations_benchmark",
    "sentence_start",
    "separation",
]
