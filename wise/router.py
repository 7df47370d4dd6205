"""The routed projection that replaces the edited layer at inference (paper Sec. 2.3.1, Eq. 4).

For an input activation ``a`` (the input of the MLP output projection) the main memory gives ``W a``; each
side memory k adds ``Delta_k a`` with ``Delta_k = W'_k - W``. The routing activation of memory k on a query is
``||Delta_k a_t||_2`` per token t (the paper's ``||A(x) (W'_v - W_v)||``), reduced over the query span to one
score per sequence. A sequence is answered by the memory with the highest score relative to its threshold if
that score reaches the threshold, otherwise by the main memory. Everything is batched: no host syncs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def token_activation(a: torch.Tensor, delta: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Per-token routing activation ``||Delta a_t||``.

    Args:
        a: (B, T, d_in) inputs of the edited projection.
        delta: (d_out, d_in) side-memory task vector ((d_in, d_out) when ``transposed``).
        transposed: weight stored as (in, out), as GPT-2's Conv1D does.

    Returns:
        (B, T) activations.
    """
    out = a @ delta if transposed else a @ delta.T  # (B, T, d_out)
    return out.norm(dim=-1)


def reduce_span(values: torch.Tensor, span: torch.Tensor | None, how: str) -> torch.Tensor:
    """Reduce per-token values (..., B, T) over the query span (B, T) to one score per sequence (..., B).

    A sequence whose span is empty scores 0 (it never routes to a side memory).
    """
    if span is None:
        span = torch.ones(values.shape[-2:], dtype=torch.bool, device=values.device)
    span = span.to(values.dtype)  # (B, T)
    if how == "mean":
        return (values * span).sum(-1) / span.sum(-1).clamp(min=1.0)
    if how == "max":
        return (values * span).amax(-1)
    if how == "last":
        # one-hot on the last query token of each row: where the running count reaches the row's total
        count = span.cumsum(-1)
        last = (count == count[..., -1:]) & (span > 0)
        return (values * last).sum(-1)
    raise ValueError(f"unknown router reduction {how!r}; choose one of ['last', 'max', 'mean']")


class RoutedLinear(nn.Module):
    """Drop-in replacement for the edited projection: main memory plus routed side memories.

    The main weight (and bias) are the original module's parameters, shared, not copied. Side memories live
    in a (K, d_out, d_in) buffer of task vectors with (K,) float32 thresholds; K may be 0.
    """

    def __init__(self, base: nn.Module, transposed: bool = False, reduce: str = "mean") -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        self.transposed = transposed
        self.reduce = reduce
        shape = tuple(self.weight.shape)
        self.register_buffer("deltas", torch.zeros((0, *shape), dtype=self.weight.dtype), persistent=False)
        self.register_buffer("thresholds", torch.zeros(0, dtype=torch.float32), persistent=False)
        self._span: torch.Tensor | None = None
        self._routing_enabled = True
        self._holding = False
        self._held: torch.Tensor | None = None
        # diagnostics of the latest forward (not used for computation): chosen memory and best score/threshold
        self.last_choice: torch.Tensor | None = None
        self.last_ratio: torch.Tensor | None = None

    def set_memories(self, deltas: torch.Tensor, thresholds: torch.Tensor) -> None:
        """Replace the routed side memories (K, d_out, d_in) and their thresholds (K,)."""
        if (
            deltas.dim() != 3
            or deltas.shape[1:] != self.weight.shape
            or deltas.shape[0] != thresholds.shape[0]
        ):
            raise ValueError(
                f"side memories {tuple(deltas.shape)} / thresholds {tuple(thresholds.shape)} do not fit "
                f"weight {tuple(self.weight.shape)}"
            )
        self.deltas = deltas.to(self.weight.device, self.weight.dtype)
        self.thresholds = thresholds.to(self.weight.device, torch.float32)

    @contextlib.contextmanager
    def query_span(self, span: torch.Tensor | None) -> Iterator[None]:
        """Route on these positions only ((B, T) bool: the query's prompt tokens, no padding)."""
        previous, self._span = self._span, span
        try:
            yield
        finally:
            self._span = previous

    @contextlib.contextmanager
    def main_only(self) -> Iterator[None]:
        """Answer every query from the main memory (pre-edit behaviour)."""
        previous, self._routing_enabled = self._routing_enabled, False
        try:
            yield
        finally:
            self._routing_enabled = previous

    def _project(self, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return a @ weight if self.transposed else a @ weight.T

    def scores(self, a: torch.Tensor) -> torch.Tensor:
        """Routing score of every memory for every sequence: (K, B).

        Only the span's tokens are scored (the others do not enter the reduction): with hundreds of memories
        this product, K times the layer's own, is most of a forward's cost.
        """
        span = self._span
        if span is not None and span.shape != a.shape[:2]:
            # Decode steps with a KV cache see one new token: route it on itself.
            span = None
        k = self.deltas.shape[0]
        if span is None:
            eq = "btd,kdo->kbto" if self.transposed else "btd,kod->kbto"
            per_token = torch.einsum(eq, a, self.deltas).norm(dim=-1)  # (K, B, T)
            return reduce_span(per_token.float(), span, self.reduce)
        span = span.to(a.device, torch.bool)
        picked = a[span]  # (N, d_in): the span's tokens only
        if self.transposed:
            act = torch.einsum("nd,kdo->kno", picked, self.deltas).norm(dim=-1)  # (K, N)
        else:
            # one GEMM against all memories stacked: (N, d_in) x (d_in, K * d_out)
            flat = self.deltas.reshape(k * self.deltas.shape[1], self.deltas.shape[2])
            act = (picked @ flat.T).view(picked.shape[0], k, -1).norm(dim=-1).T  # (K, N)
        per_token = torch.zeros((k, *a.shape[:2]), dtype=torch.float32, device=a.device)
        per_token[:, span] = act.float()
        return reduce_span(per_token, span, self.reduce)

    @contextlib.contextmanager
    def hold_route(self) -> Iterator[None]:
        """Decide the route on the first forward inside this block and keep it for the later ones.

        Greedy decoding routes on the prompt: the first forward sees it (as a serving engine's prefill does),
        and the decode steps after it, with or without a KV cache, answer from the same memory without
        scoring every memory again. The held route applies to batches of the first forward's size only.
        """
        previous = (self._holding, self._held)
        self._holding, self._held = True, None
        try:
            yield
        finally:
            self._holding, self._held = previous

    def route(self, a: torch.Tensor) -> torch.Tensor:
        """Index of the answering memory per sequence (B,), -1 for the main memory."""
        batch = a.shape[0]
        if self.deltas.shape[0] == 0 or not self._routing_enabled:
            self.last_ratio = torch.zeros(batch, device=a.device)
            return torch.full((batch,), -1, dtype=torch.long, device=a.device)
        if self._holding and self._held is not None:
            if self._held.shape[0] != batch:
                raise ValueError(
                    f"held route is for {self._held.shape[0]} sequences, this forward has {batch}"
                )
            return self._held
        scores = self.scores(a)  # (K, B)
        ratio = scores / self.thresholds.clamp(min=1e-12).unsqueeze(1)  # (K, B)
        best_ratio, best = ratio.max(dim=0)  # (B,)
        self.last_ratio = best_ratio.detach()
        choice = torch.where(best_ratio >= 1.0, best, torch.full_like(best, -1))
        if self._holding:
            self._held = choice
        return choice

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        out = self._project(a, self.weight)  # (B, T, d_out)
        if self.bias is not None:
            out = out + self.bias
        choice = self.route(a)  # (B,)
        self.last_choice = choice.detach()
        if self.deltas.shape[0] == 0 or not self._routing_enabled:
            return out
        # Gather each sequence's side memory and add its contribution in one batched matmul; sequences on the
        # main memory (choice -1) borrow memory 0 and are masked out, so nothing is copied per call.
        chosen = self.deltas[choice.clamp(min=0)]  # (B, d_out, d_in)
        extra = a @ chosen if self.transposed else a @ chosen.transpose(1, 2)  # (B, T, d_out)
        return out + extra * (choice >= 0).to(extra.dtype).view(-1, 1, 1)
