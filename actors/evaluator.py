"""The evaluator actor: measures retention of a WISE state on its own model replica, off the editors' path.

Every ``eval.every`` edits the orchestrator sends it the latest merged state (through the object store) with a
sample of all past edits and a fixed locality set; at the end of a job it measures the final state on every
applied edit (or ``eval.max_records``), before and after editing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from actors.replica import ModelSpec, load_replica
from wise.config import WiseConfig
from wise.evaluate import agreement, answer_predictions, evaluate_records, mean
from wise.factory import make_editor

logger = logging.getLogger(__name__)


class EvaluatorActor:
    """Holds one model replica routed through a :func:`~wise.factory.make_editor` editor that never trains."""

    def __init__(self, model: ModelSpec, cfg: WiseConfig) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        m, tok = load_replica(model)
        self.editor = make_editor(m, tok, cfg)

    def evaluate(
        self,
        tensors: dict[str, torch.Tensor],
        meta: dict,
        records: Sequence,
        *,
        locality: Sequence = (),
        generate: bool = True,
        pre: bool = False,
        recent: Sequence = (),
    ) -> dict:
        """Load a state and measure retention.

        Args:
            tensors, meta: an editor state (:func:`wise.editor.compose_state`).
            records: edit records (prompt/target, optional rephrase and locality fields) to measure.
            locality: extra records whose locality pairs form the fixed locality set.
            generate: also the free-generation variants.
            pre: also measure the pre-edit model (main memory only) on ``records``.
            recent: more edit records, measured per edit only (the recent window's edits not in ``records``).

        Returns:
            ``{"edits": n_edits_in_state, "post": evaluate_records(...), "locality_fixed": float|None,
            "pre": ..., "recent": [per-edit results of ``recent``]}``.
        """
        t0 = time.perf_counter()
        ed = self.editor
        ed.load_state_dict(tensors, meta)
        args = (ed.model, ed.routed, ed.tokens)
        out: dict = {"edits": meta["n_edits"], "evaluated": len(records)}
        out["post"] = evaluate_records(*args, records, generate=generate)
        pairs = [
            (r.locality_prompt, r.locality_answer)
            for r in locality
            if getattr(r, "locality_prompt", None) and getattr(r, "locality_answer", None)
        ]
        if pairs:
            after = answer_predictions(*args, pairs)
            before = answer_predictions(*args, pairs, main_only=True)
            out["locality_fixed"] = mean(agreement(after, before))
        if recent:
            out["recent"] = evaluate_records(*args, recent, generate=generate)["per_edit"]
        if pre:
            out["pre"] = evaluate_records(*args, records, main_only=True, generate=generate)
        out["seconds"] = time.perf_counter() - t0
        return out
