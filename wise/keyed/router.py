"""The edited projection of the keyed layout at inference: main memory plus keyed residual memories.

Drop-in for the edited module of a Hugging Face model, with the router interface that
:func:`wise.evaluate.evaluate_records` drives (``query_span``, ``main_only``, ``hold_route``, ``last_choice``,
``last_ratio``), as :class:`wise.router.RoutedLinear` offers it for the shards layout. The route of a sequence
is decided once, on its query span (the prompt), by :func:`wise.keyed.table.route`; under ``hold_route`` the
decode steps keep it, which is also what the vLLM replicas do (``docs/serving.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from wise.keyed.table import SubjectTable, last_positions, residual, route
from wise.memory import Memory


class KeyedLinear(nn.Module):
    """Main weight (shared with the original module, never changed) plus the routed residual memories.

    Args:
        base: the original projection (its ``weight``/``bias`` are used as they are).
        transposed: the weight is stored (in, out), as GPT-2's Conv1D does.
    """

    def __init__(self, base: nn.Module, transposed: bool = False) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        self.transposed = transposed
        d_out, d_in = (self.weight.shape[1], self.weight.shape[0]) if transposed else tuple(self.weight.shape)
        self.d_in, self.d_out = int(d_in), int(d_out)
        dev = self.weight.device
        self.register_buffer("table_t", torch.zeros(0, self.d_out, device=dev), persistent=False)
        self.register_buffer("columns", torch.zeros(0, 1, dtype=torch.long, device=dev), persistent=False)
        self.register_buffer("memory_of", torch.zeros(0, dtype=torch.long, device=dev), persistent=False)
        self.register_buffer("relkeys", torch.zeros(0, 1, device=dev), persistent=False)
        self.values: torch.Tensor | None = None  # (E, d_out) each entry's output vector (keyed.values)
        self.register_buffer("projection", torch.zeros(self.d_in, 1, device=dev), persistent=False)
        self.register_buffer("center", torch.zeros(1, device=dev), persistent=False)
        self.subjects: SubjectTable | None = None
        self.entry_ids: list[str] = []
        self.min_similarity: float | None = None
        self.name_flags: torch.Tensor | None = None  # whole names (wise.keyed.names), None: off
        self._ids: torch.Tensor | None = None  # input ids of the current forward (see attach)
        # keyed.relation_key: "mean" reads this module's input, "residual" the edited block's input at the
        # query's last token: block_input, (B, T, h) of the latest forward, captured by attach
        self.relation_key = "mean"
        self.block_input: torch.Tensor | None = None
        self._span: torch.Tensor | None = None
        self._routing_enabled = True
        self._holding = False
        self._held: torch.Tensor | None = None
        # diagnostics of the latest forward: answering entry per sequence (-1 main) and 1 + relation similarity
        self.last_choice: torch.Tensor | None = None
        self.last_ratio: torch.Tensor | None = None

    def attach(
        self, model: nn.Module, block: nn.Module | None = None
    ) -> list[torch.utils.hooks.RemovableHandle]:
        """Let the router see the token ids of every forward of ``model`` (it routes on the query's subject)
        and, given the edited ``block``, that block's input (the residual relation key reads it)."""

        def grab(_module, args, kwargs):
            ids = args[0] if args else kwargs.get("input")
            self._ids = ids

        def grab_block(_module, args, kwargs):
            self.block_input = args[0] if args else kwargs.get("hidden_states")

        hooks = [model.get_input_embeddings().register_forward_pre_hook(grab, with_kwargs=True)]
        if block is not None:
            hooks.append(block.register_forward_pre_hook(grab_block, with_kwargs=True))
        return hooks

    @property
    def n_entries(self) -> int:
        return len(self.entry_ids)

    @torch.no_grad()
    def set_memories(
        self,
        memories: Sequence[Memory],
        projection: torch.Tensor,
        center: torch.Tensor | None,
        min_similarity: float | None = None,
        name_flags: torch.Tensor | None = None,
    ) -> None:
        """Route among the edits of ``memories`` (in order; each with ``columns``, ``relkeys``, ``subjects``);
        ``name_flags`` (:func:`wise.keyed.names.name_flags`) keeps subjects inside longer names from routing."""
        mems = [m for m in memories if m.columns is not None and m.relkeys is not None]
        dev, dtype = self.weight.device, self.weight.dtype
        self.projection = projection.to(dev, torch.float32)
        self.center = (torch.zeros(projection.shape[1]) if center is None else center).to(dev, torch.float32)
        self.min_similarity = min_similarity
        self.name_flags = None if name_flags is None else name_flags.to(dev)
        if not mems or not sum(len(m.edit_ids) for m in mems):
            self.table_t = torch.zeros(0, self.d_out, device=dev, dtype=dtype)
            self.entry_ids, self.subjects, self.values = [], None, None
            return
        self.table_t = torch.cat([(m.delta if self.transposed else m.delta.T) for m in mems]).to(dev, dtype)
        self.columns = torch.cat([m.columns for m in mems]).to(dev, torch.long)  # type: ignore[misc]
        self.memory_of = torch.cat(
            [torch.full((len(m.edit_ids),), j, dtype=torch.long) for j, m in enumerate(mems)]
        ).to(dev)
        self.relkeys = torch.cat([m.relkeys for m in mems]).to(dev, torch.float32)  # type: ignore[misc]
        self.entry_ids = [e for m in mems for e in m.edit_ids]
        with_values = [m.values is not None for m in mems if m.edit_ids]
        if any(with_values) and not all(with_values):
            raise ValueError("some memories hold output vectors (keyed.values) and others do not")
        self.values = (
            torch.cat([m.values for m in mems if m.edit_ids]).to(dev, dtype)  # type: ignore[misc]
            if all(with_values)
            else None
        )
        self.subjects = SubjectTable.build([s for m in mems for s in m.subjects], dev)

    @contextlib.contextmanager
    def query_span(self, span: torch.Tensor | None) -> Iterator[None]:
        """Route on these positions only ((B, T) bool: the query's prompt tokens, no padding)."""
        previous, self._span = self._span, span
        try:
            yield
        finally:
            self._span = previous

    @contextlib.contextmanager
    def names(self, flags: torch.Tensor | None) -> Iterator[None]:
        """Route with these whole-name flags (:func:`wise.keyed.names.name_flags`; None: every contiguous subject
        match counts) inside this block, whatever the settings say (benchmarks compare the two)."""
        previous = self.name_flags
        self.name_flags = None if flags is None else flags.to(self.weight.device)
        try:
            yield
        finally:
            self.name_flags = previous

    @contextlib.contextmanager
    def main_only(self) -> Iterator[None]:
        """Answer every query from the main memory (pre-edit behaviour)."""
        previous, self._routing_enabled = self._routing_enabled, False
        try:
            yield
        finally:
            self._routing_enabled = previous

    @contextlib.contextmanager
    def hold_route(self) -> Iterator[None]:
        """Decide the route on the first forward inside this block (the prefill) and keep it for the later
        ones (the decode steps)."""
        previous = (self._holding, self._held)
        self._holding, self._held = True, None
        try:
            yield
        finally:
            self._holding, self._held = previous

    def route(self, a: torch.Tensor) -> torch.Tensor:
        """Answering entry per sequence (B,), -1 for the main memory."""
        b, t = a.shape[:2]
        none = torch.full((b,), -1, dtype=torch.long, device=a.device)
        if not self.n_entries or not self._routing_enabled or self.subjects is None:
            self.last_ratio = torch.zeros(b, device=a.device)
            return none
        if self._holding and self._held is not None:
            if self._held.shape[0] != b:
                raise ValueError(f"held route is for {self._held.shape[0]} sequences, this forward has {b}")
            return self._held
        ids = self._ids
        if ids is None or tuple(ids.shape) != (b, t):
            raise RuntimeError("KeyedLinear needs the forward's input ids: call attach(model) once")
        span = self._span
        if span is None or tuple(span.shape) != (b, t):
            span = torch.ones((b, t), dtype=torch.bool, device=a.device)
        seg = torch.arange(b, device=a.device).repeat_interleave(t)
        last_inputs = None
        if self.relation_key == "residual":
            h = self.block_input
            if h is None or tuple(h.shape[:2]) != (b, t):
                raise RuntimeError(
                    "the residual relation key needs the edited block's input: attach(model, block)"
                )
            last_inputs = h[torch.arange(b, device=a.device), last_positions(span.to(a.device))]
        res = route(
            ids.reshape(-1),
            a.reshape(b * t, -1),
            seg,
            span.to(a.device, torch.bool).reshape(-1),
            b,
            self.subjects,
            self.relkeys,
            self.projection,
            self.center,
            self.min_similarity,
            self.name_flags,
            last_inputs,
        )
        self.last_ratio = torch.where(res.choice >= 0, 1.0 + res.similarity, torch.zeros_like(res.similarity))
        if self._holding:
            self._held = res.choice
        return res.choice

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        out = a @ self.weight if self.transposed else a @ self.weight.T  # (B, T, d_out)
        if self.bias is not None:
            out = out + self.bias
        choice = self.route(a)  # (B,)
        self.last_choice = choice.detach()
        if not self.n_entries or not self._routing_enabled:
            return out
        b, t = a.shape[:2]
        entry = choice.repeat_interleave(t)  # every token of a routed sequence reads its edit's columns
        extra = residual(a.reshape(b * t, -1), entry, self.columns, self.memory_of, self.table_t, self.values)
        return out + extra.view(b, t, -1).to(out.dtype)


__all__ = ["KeyedLinear"]
