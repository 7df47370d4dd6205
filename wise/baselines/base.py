"""What the baseline editors share: their configs' common keys, the teacher-forced target loss, and the
safetensors + JSON state format (never pickle) that :class:`~wise.editor.WiseEditor` also uses.

A baseline editor offers the interface the benchmarks drive WiseEditor through: ``prepare()``,
``apply(edits)``, ``n_edits``, ``applied_ids()``, ``state_dict()`` / ``load_state_dict()``, ``save()`` /
``load()``, and ``model`` / ``routed`` / ``tokens`` for :func:`wise.evaluate.evaluate_records` (``routed``
answers ``main_only()`` with the pre-edit layer, so locality is measured exactly as for WISE).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from wise.batch import IGNORE, Tokens
from wise.layout import resolve_layout
from wise.state import StateError, read_state, write_state

BASELINE_STATE_VERSION = 1


class BaselineConfig(BaseModel):
    """Keys every baseline shares: where it edits and the prompt limit (same meaning as in WiseConfig)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int = Field(23, ge=0, description="index of the edited decoder block")
    module: str | None = Field(None, description="edited module path with '{layer}'; None: by architecture")
    max_prompt_tokens: int = Field(256, ge=8, description="longer edit prompts are rejected")


class WrappedLinear(nn.Module):
    """The edited projection inside a baseline: the original weight (never modified) plus the router interface
    :func:`wise.evaluate.evaluate_records` drives (``query_span``, ``main_only``, ``last_choice``,
    ``last_ratio``), as :class:`~wise.router.RoutedLinear` offers it for WISE."""

    def __init__(self, base: nn.Module, transposed: bool = False) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        self.transposed = transposed
        self._span: torch.Tensor | None = None
        self._on = True
        self.last_choice: torch.Tensor | None = None  # (B,) what answered each row, -1 the unedited layer
        self.last_ratio: torch.Tensor | None = None  # (B,) >= 1 where the edit applied

    @contextlib.contextmanager
    def _swap(self, attr: str, value) -> Iterator[None]:
        previous = getattr(self, attr)
        setattr(self, attr, value)
        try:
            yield
        finally:
            setattr(self, attr, previous)

    def query_span(self, span: torch.Tensor | None) -> contextlib.AbstractContextManager:
        """Route on these positions ((B, T) bool: the query's prompt tokens)."""
        return self._swap("_span", span)

    def main_only(self) -> contextlib.AbstractContextManager:
        """Answer from the unedited layer (the pre-edit model)."""
        return self._swap("_on", False)

    def main_output(self, a: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``a W^T + b`` with the original weight (or ``weight``): (..., d_out)."""
        w = self.weight if weight is None else weight
        out = a.to(w.dtype) @ w if self.transposed else a.to(w.dtype) @ w.T
        return out + self.bias if self.bias is not None else out


@dataclass(frozen=True)
class BaselineOutcome:
    """Per applied edit: optimisation steps and the final target loss."""

    edit_id: str
    steps: int
    loss: float


class PrefixLoss:
    """The target loss of a fixed batch as a function of what is added to the edited projection's output.

    The network below the edited projection and its input ``a`` do not change while a baseline trains (only
    the projection's output does), so the frozen part runs once (:meth:`CachedEngine.frozen_prefix`) and each
    step runs the blocks above only. Equals :func:`target_loss` of the full forward pass (tested).

    Args:
        model: the causal LM with its edited projection wrapped (must offer ``main_only()``).
        layout: the resolved layout of the edited projection.
        tokens: tokenisation conventions.
        pairs: ``(prompt, answer)`` pairs.
    """

    def __init__(self, model: nn.Module, layout, tokens: Tokens, pairs: Sequence[tuple[str, str]]) -> None:
        from wise.engine import CachedEngine

        self.engine = CachedEngine(model, layout)
        device = next(model.parameters()).device
        self.batch = tokens.collate([tokens.row(p, a) for p, a in pairs]).to(device)
        self.state = self.engine.frozen_prefix(self.batch)
        self.a = self.state.a  # (B, T, d_in) input of the edited projection

    def __call__(self, extra: torch.Tensor) -> torch.Tensor:
        """Mean CE over all answer tokens with ``extra`` (B, T, d_out) added to the projection's output."""
        return self.engine.label_loss(self.state, extra).mean()


def target_loss(model: nn.Module, tokens: Tokens, pairs: Sequence[tuple[str, str]], span_ctx) -> torch.Tensor:
    """Mean negative log-likelihood of each answer's tokens after its prompt (teacher forcing), by a full forward
    pass: the reference :class:`PrefixLoss` is tested against.

    Args:
        model: the causal LM (its edited layer carries the trainable parameters).
        tokens: tokenisation conventions (the same rows evaluation uses).
        pairs: ``(prompt, answer)`` pairs.
        span_ctx: called with the batch's (B, T) query span; returns the context manager under which the edited
            layer sees it (``routed.query_span``).

    Returns:
        A scalar loss (mean over all answer tokens).
    """
    device = next(model.parameters()).device
    batch = tokens.collate([tokens.row(p, a) for p, a in pairs]).to(device)
    with span_ctx(batch.span):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    where = batch.labels != IGNORE  # (B, T) positions that predict an answer token
    return F.cross_entropy(logits[where].float(), batch.labels[where])


def check_meta(meta: dict, kind: str, cfg: BaseModel, module_path: str) -> None:
    """Refuse a state written by another baseline, another config or another edited module.

    Raises:
        StateError: on any mismatch, naming it.
    """
    if meta.get("version") != BASELINE_STATE_VERSION or meta.get("kind") != kind:
        raise StateError(f"state is {meta.get('kind')} v{meta.get('version')}, not {kind} v1")
    if meta.get("module_path") != module_path:
        raise StateError(f"state edits {meta.get('module_path')}, this editor {module_path}")
    saved = type(cfg).model_validate(meta["config"])
    if saved != cfg:
        diff = sorted(k for k, v in saved.model_dump().items() if cfg.model_dump()[k] != v)
        raise StateError(f"state was written with different {kind} settings: {diff}")


class BaselineEditor:
    """What FT-L and GRACE editors share: the wrapped layer, the applied ids, and the state files.

    Args:
        model: a Hugging Face causal LM; frozen, its edited projection replaced in place by ``wrap(module,
            transposed)``.
        tokenizer: the model's tokenizer.
        cfg: the baseline's settings.
        wrap: builds the replacement module (which offers ``main_only()`` and ``query_span()``).
    """

    kind = "baseline"

    def __init__(
        self, model: nn.Module, tokenizer, cfg: BaselineConfig, wrap: Callable[[nn.Module, bool], nn.Module]
    ):
        self.model = model
        self.cfg = cfg
        self.tokens = Tokens(tokenizer, cfg.max_prompt_tokens)
        model.requires_grad_(False)
        model.eval()
        lay = resolve_layout(model, cfg.layer, cfg.module)
        self.module_path = lay.module_path
        self.routed = wrap(lay.module, lay.layout.transposed)
        model.set_submodule(lay.module_path, self.routed)
        self.layout = resolve_layout(model, cfg.layer, cfg.module)
        self.edit_ids: list[str] = []

    @property
    def n_edits(self) -> int:
        return len(self.edit_ids)

    def applied_ids(self) -> list[str]:
        """Ids of all applied edits, in application order."""
        return list(self.edit_ids)

    def prepare(self) -> None:
        """One-time setup before timing edits (nothing by default)."""

    def _meta(self, **extra) -> dict:
        return {
            "version": BASELINE_STATE_VERSION,
            "kind": self.kind,
            "config": self.cfg.model_dump(mode="json"),
            "module_path": self.module_path,
            "edit_ids": self.edit_ids,
            **extra,
        }

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        raise NotImplementedError

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        """Write the state atomically to ``directory`` (safetensors + JSON)."""
        return write_state(directory, *self.state_dict())

    def load(self, directory: str | Path) -> None:
        """Restore the state written by :meth:`save`.

        Raises:
            StateError: missing files, or a state of another baseline, config or module.
        """
        tensors, meta = read_state(directory)
        check_meta(meta, self.kind, self.cfg, self.module_path)
        self.edit_ids = list(meta["edit_ids"])
        self.load_state_dict(tensors, meta)
