"""FT-L: constrained fine-tuning of one layer, the weakest baseline of the WISE paper (Wang et al., NeurIPS
2024, Sec. 3.1 and Table 2), in the form ROME used (Meng et al. 2022, App.; after Zhu et al. 2020).

Each edit fine-tunes the weight ``W`` of the edited projection (by default layer 23's MLP down-projection, the
layer WISE edits) on the edit's target tokens: Adam, ``n_iter`` steps at most (``lr`` 5e-4, 25 steps), on the
mean negative log-likelihood of the target after the prompt, then projects the accumulated change onto the
L-infinity ball ``|W - W_0| <= norm_constraint`` (5e-4 in ROME's FT-L). There is no router and no memory of
the pre-edit weight at inference: every query sees ``W_0 + Delta``, which is why sequential FT-L forgets earlier
edits and damages unrelated inputs as T grows. ``W_0`` is kept (never modified) so that evaluation can measure
locality against the pre-edit model exactly as for WISE.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from pydantic import Field
from torch import nn

from wise.baselines.base import BaselineConfig, BaselineEditor, BaselineOutcome, PrefixLoss, WrappedLinear
from wise.trainer import EditLike

logger = logging.getLogger(__name__)


class FTLConfig(BaselineConfig):
    """FT-L hyper-parameters (ROME's constrained fine-tuning: Adam, 25 steps, lr 5e-4, L-inf bound 5e-4)."""

    lr: float = Field(5e-4, gt=0)
    n_iter: int = Field(25, ge=1)
    norm_constraint: float = Field(5e-4, gt=0, description="L-inf bound on |W - W_0| over all edits")
    early_stop_loss: float = Field(0.0, ge=0, description="stop an edit early below this loss (0: never)")


class FineTunedLinear(WrappedLinear):
    """The edited projection with a fine-tuned offset: ``a (W_0 + Delta)^T + b``; ``main_only()`` drops Delta.
    FT-L has no router: every query "routes" to the edited weight."""

    def __init__(self, base: nn.Module, transposed: bool = False) -> None:
        super().__init__(base, transposed)
        self.delta = nn.Parameter(torch.zeros_like(base.weight), requires_grad=False)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        out = self.main_output(a, self.weight + self.delta if self._on else None)  # (B, T, d_out)
        batch = a.shape[0]
        self.last_choice = torch.full((batch,), 0 if self._on else -1, dtype=torch.long, device=a.device)
        self.last_ratio = torch.full((batch,), float(self._on), device=a.device)
        return out


class FTLEditor(BaselineEditor):
    """Sequential FT-L editing of one model (the benchmarks' editor interface; see :mod:`wise.baselines.base`).

    Args:
        model: a Hugging Face causal LM; frozen, its edited projection replaced in place.
        tokenizer: the model's tokenizer.
        cfg: FT-L hyper-parameters.
    """

    kind = "ft-l"

    def __init__(self, model: nn.Module, tokenizer, cfg: FTLConfig) -> None:
        super().__init__(model, tokenizer, cfg, FineTunedLinear)

    def apply(self, edits: Iterable[EditLike]) -> list[BaselineOutcome]:
        """Fine-tune on each edit in turn.

        Raises:
            PromptTooLongError: an edit exceeds ``max_prompt_tokens`` (nothing of it is applied).
        """
        return [self._apply_one(e) for e in edits]

    def _apply_one(self, edit: EditLike) -> BaselineOutcome:
        self.tokens.row(edit.prompt, edit.target)  # validate before changing anything
        delta = self.routed.delta
        # the prefix runs once, with W_0 alone; Delta's contribution so far is added back as `base`
        with torch.no_grad():
            objective = PrefixLoss(self.model, self.layout, self.tokens, [(edit.prompt, edit.target)])
            base = objective.a @ delta if self.routed.transposed else objective.a @ delta.T
        step = torch.zeros_like(delta, requires_grad=True)  # this edit's change on top of Delta
        opt = torch.optim.Adam([step], lr=self.cfg.lr)  # a fresh optimiser per edit, as ROME's FT-L
        steps, loss_value = 0, float("nan")
        bound = self.cfg.norm_constraint
        try:
            for i in range(self.cfg.n_iter):
                steps = i + 1
                opt.zero_grad(set_to_none=True)
                extra = objective.a @ step if self.routed.transposed else objective.a @ step.T
                loss = objective(base + extra)
                loss_value = float(loss.detach())
                if loss_value < self.cfg.early_stop_loss:
                    break
                loss.backward()
                opt.step()
                # project Delta + step onto |W - W_0|_inf <= eps (ROME's FT-L constraint)
                with torch.no_grad():
                    step.copy_((delta + step).clamp(-bound, bound) - delta)
        finally:
            with torch.no_grad():
                delta.add_(step.detach())
        self.edit_ids.append(edit.id)
        logger.debug("ft-l %s: %d steps, loss %.4f", edit.id, steps, loss_value)
        return BaselineOutcome(edit.id, steps, loss_value)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``({"delta": W - W_0}, metadata)``."""
        return {"delta": self.routed.delta.detach().contiguous().cpu()}, self._meta()

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore the tensors of a state from :meth:`state_dict` (checked by :meth:`load`)."""
        with torch.no_grad():
            self.routed.delta.copy_(tensors["delta"])
        self.edit_ids = list(meta["edit_ids"])
