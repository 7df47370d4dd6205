"""GRACE: a discrete key-value codebook at one layer (Hartvigsen et al., NeurIPS 2023), the WISE paper's
strongest locality baseline (Wang et al., NeurIPS 2024, Table 2).

The edited projection (by default layer 23's MLP down-projection, the layer WISE edits) is wrapped by a
codebook of entries ``(key, value, radius, label)``:

- **key**: the projection's input at the *last prompt token* (one vector per edit, not one per token: the
  choice the GRACE paper makes for decoder models; a query is keyed the same way, on the last token of its
  prompt, the query span a serving engine sees at prefill);
- **value**: a vector trained so that, put in place of the projection's output, the model emits the target;
  it replaces the output at the last prompt token and every later position (the positions that predict the
  answer), so multi-token targets are produced from one value;
- **deferral radius** ``epsilon``: a query whose key lies within the radius of its nearest codebook key
  (Euclidean) uses that entry's value; any other query is answered by the unedited layer.

Codebook maintenance follows the paper's Algorithm 1: a new edit whose key is farther than
``epsilon_init + radius`` from its nearest entry adds an entry; a nearby entry with the same label has its
radius expanded to cover the new key; a nearby entry with another label is split (both radii set to half
their distance). ``epsilon_init`` is given in units of the layer's key scale (the median distance between
keys of the irrelevant pool's prompts) with ``eps_scale: auto``, or as is with ``absolute``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from wise.baselines.base import BaselineConfig, BaselineEditor, BaselineOutcome, PrefixLoss, WrappedLinear
from wise.state import StateError
from wise.trainer import EditLike

logger = logging.getLogger(__name__)


class GraceConfig(BaselineConfig):
    """GRACE hyper-parameters: deferral radius, value training (Adam), and how the radius is scaled."""

    eps_init: float = Field(0.5, gt=0, description="initial deferral radius (in key-scale units with auto)")
    eps_scale: Literal["auto", "absolute"] = "auto"
    lr: float = Field(1.0, gt=0, description="Adam learning rate of a new value")
    n_iter: int = Field(100, ge=1, description="value training steps at most")
    early_stop_loss: float = Field(0.01, ge=0, description="stop training a value below this target loss")


def last_span_index(span: torch.Tensor) -> torch.Tensor:
    """Index of each row's last query token: (B, T) bool -> (B,) (the last position for an empty span)."""
    positions = torch.arange(span.shape[1], device=span.device).expand_as(span)  # (B, T)
    last = torch.where(span, positions, torch.full_like(positions, -1)).amax(-1)
    return torch.where(last >= 0, last, torch.full_like(last, span.shape[1] - 1))


class GraceLinear(WrappedLinear):
    """The edited projection behind a GRACE codebook (keys (K, d_in), values (K, d_out), radii (K,)).

    Speaks the router interface of :func:`wise.evaluate.evaluate_records`: ``query_span`` (the prompt's
    tokens, whose last one is the key), ``main_only``, ``last_choice`` (entry used per row, -1 none) and
    ``last_ratio`` (radius / distance of the nearest entry: >= 1 uses it).
    """

    def __init__(self, base: nn.Module, transposed: bool = False) -> None:
        super().__init__(base, transposed)
        d_out, d_in = base.weight.shape[::-1] if transposed else base.weight.shape
        self.register_buffer("keys", torch.zeros(0, d_in), persistent=False)
        self.register_buffer("values", torch.zeros(0, d_out), persistent=False)
        self.register_buffer("radii", torch.zeros(0), persistent=False)
        self._override: torch.Tensor | None = None  # (d_out,) a value being trained: used for every row
        self.last_key: torch.Tensor | None = None  # (B, d_in) keys of the latest forward

    def training_value(self, value: torch.Tensor) -> contextlib.AbstractContextManager:
        """Answer every row with ``value`` (d_out,) at its answer positions (the full-forward oracle of
        :class:`~wise.baselines.base.PrefixLoss` in the tests)."""
        return self._swap("_override", value)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        out = self.main_output(a)  # (B, T, d_out)
        batch, width = a.shape[:2]
        span = self._span
        if span is None or span.shape != a.shape[:2]:
            span = torch.ones(batch, width, dtype=torch.bool, device=a.device)  # no span: the whole input
        last = last_span_index(span)  # (B,)
        rows = torch.arange(batch, device=a.device)
        self.last_key = a[rows, last].detach()  # (B, d_in)
        answer_pos = torch.arange(width, device=a.device).unsqueeze(0) >= last.unsqueeze(1)  # (B, T)
        if self._override is not None:
            self.last_choice = torch.zeros(batch, dtype=torch.long, device=a.device)
            self.last_ratio = torch.ones(batch, device=a.device)
            value = self._override.to(out.dtype).expand(batch, -1)  # (B, d_out)
            return torch.where(answer_pos.unsqueeze(-1), value.unsqueeze(1), out)
        if not self._on or self.keys.shape[0] == 0:
            self.last_choice = torch.full((batch,), -1, dtype=torch.long, device=a.device)
            self.last_ratio = torch.zeros(batch, device=a.device)
            return out
        dist = torch.cdist(self.last_key.float(), self.keys.float())  # (B, K)
        nearest, idx = dist.min(-1)  # (B,)
        radius = self.radii[idx]
        hit = nearest <= radius
        self.last_choice = torch.where(hit, idx, torch.full_like(idx, -1))
        self.last_ratio = radius / nearest.clamp(min=1e-12)
        value = self.values[idx].to(out.dtype)  # (B, d_out)
        replace = (answer_pos & hit.unsqueeze(1)).unsqueeze(-1)  # (B, T, 1)
        return torch.where(replace, value.unsqueeze(1), out)


class GraceEditor(BaselineEditor):
    """Sequential GRACE editing of one model (the benchmarks' editor interface; see :mod:`wise.baselines.base`).

    Args:
        model: a Hugging Face causal LM; frozen, its edited projection wrapped in place.
        tokenizer: the model's tokenizer.
        cfg: GRACE hyper-parameters.
        irrelevant: ``(prompt, answer)`` pairs of records NOT edited; with ``eps_scale: auto`` the key scale is
            measured on their prompts.
    """

    kind = "grace"

    def __init__(
        self, model: nn.Module, tokenizer, cfg: GraceConfig, irrelevant: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(model, tokenizer, cfg, GraceLinear)
        self.irrelevant = list(irrelevant)
        self.labels: list[str] = []  # target per codebook entry
        self.scale: float | None = None

    @torch.no_grad()
    def prompt_keys(self, prompts: Sequence[str]) -> torch.Tensor:
        """Keys of prompts (the projection's input at each prompt's last token): (N, d_in)."""
        out = []
        for i in range(0, len(prompts), 16):
            rows = [self.tokens.row(p, "x") for p in prompts[i : i + 16]]
            batch = self.tokens.collate(rows).to(self.routed.weight.device)
            with self.routed.main_only(), self.routed.query_span(batch.span):
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            assert self.routed.last_key is not None
            out.append(self.routed.last_key.float())
        return torch.cat(out)

    def prepare(self) -> None:
        """Fix the key scale of ``eps_scale: auto`` (median distance between the pool prompts' keys)."""
        if self.scale is not None:
            return
        if self.cfg.eps_scale == "absolute":
            self.scale = 1.0
            return
        if len(self.irrelevant) < 2:
            raise StateError("eps_scale: auto needs an irrelevant pool of at least 2 prompts")
        keys = self.prompt_keys([p for p, _ in self.irrelevant[:64]])
        dist = torch.cdist(keys, keys)
        upper = dist[torch.triu(torch.ones_like(dist, dtype=torch.bool), diagonal=1)]
        self.scale = float(upper.median())
        logger.info("GRACE key scale %.3f: epsilon_init %.3f", self.scale, self.eps_init)

    @property
    def eps_init(self) -> float:
        assert self.scale is not None
        return self.cfg.eps_init * self.scale

    def apply(self, edits: Iterable[EditLike]) -> list[BaselineOutcome]:
        """Write each edit into the codebook (Algorithm 1 of the GRACE paper).

        Raises:
            PromptTooLongError: an edit exceeds ``max_prompt_tokens`` (nothing of it is applied).
        """
        self.prepare()
        return [self._apply_one(e) for e in edits]

    def _add(self, key: torch.Tensor, value: torch.Tensor, radius: float, label: str) -> None:
        r = self.routed
        r.keys = torch.cat([r.keys, key.view(1, -1).to(r.keys)])
        r.values = torch.cat([r.values, value.detach().view(1, -1).to(r.values)])
        r.radii = torch.cat([r.radii, torch.tensor([radius]).to(r.radii)])
        self.labels.append(label)

    def _train_value(self, edit: EditLike, key: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        with torch.no_grad():  # the frozen prefix runs once; each step runs only the blocks above
            objective = PrefixLoss(self.model, self.layout, self.tokens, [(edit.prompt, edit.target)])
            main = self.routed.main_output(objective.a)  # (1, T, d_out) the layer's own output
            last = last_span_index(objective.batch.span)
            answer_pos = torch.arange(main.shape[1], device=main.device).unsqueeze(0) >= last.unsqueeze(1)
        # start from the layer's own output for this key: the unedited answer
        value = self.routed.main_output(key).detach().clone().float().requires_grad_(True)
        opt = torch.optim.Adam([value], lr=self.cfg.lr)
        steps, loss_value = 0, float("nan")
        for i in range(self.cfg.n_iter):
            steps = i + 1
            opt.zero_grad(set_to_none=True)
            # replacing the output by the value = adding (value - own output) at the answer positions
            extra = torch.where(answer_pos.unsqueeze(-1), value.to(main.dtype) - main, torch.zeros_like(main))
            loss = objective(extra)
            loss_value = float(loss.detach())
            if loss_value < self.cfg.early_stop_loss:
                break
            loss.backward()
            opt.step()
        return value.detach(), steps, loss_value

    def _apply_one(self, edit: EditLike) -> BaselineOutcome:
        key = self.prompt_keys([edit.prompt])[0]  # validates the edit's length too
        r = self.routed
        steps, loss_value = 0, float("nan")
        if r.keys.shape[0]:
            d, i = (torch.cdist(key.view(1, -1), r.keys.float())[0]).min(0)
            dist, near = float(d), int(i)
        if not r.keys.shape[0] or dist > self.eps_init + float(r.radii[near]):
            value, steps, loss_value = self._train_value(edit, key)
            self._add(key, value, self.eps_init, edit.target)
        elif self.labels[near] == edit.target:
            r.radii[near] = max(float(r.radii[near]), dist)  # expand: the entry already answers this target
        else:
            r.radii[near] = dist / 2  # split: two conflicting entries, each keeps its half
            value, steps, loss_value = self._train_value(edit, key)
            self._add(key, value, dist / 2, edit.target)
        self.edit_ids.append(edit.id)
        return BaselineOutcome(edit.id, steps, loss_value)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Codebook tensors (keys, values, radii) and metadata (labels, edit ids, key scale)."""
        r = self.routed
        tensors = {k: getattr(r, k).detach().contiguous().cpu() for k in ("keys", "values", "radii")}
        return tensors, self._meta(labels=self.labels, scale=self.scale)

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore the codebook of a state from :meth:`state_dict` (checked by :meth:`load`)."""
        r = self.routed
        for k in ("keys", "values", "radii"):
            setattr(r, k, tensors[k].to(getattr(r, k)))
        self.labels = list(meta["labels"])
        self.edit_ids = list(meta["edit_ids"])
        self.scale = meta["scale"]
