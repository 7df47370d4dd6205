"""The WISE-edited model inside vLLM: an out-of-tree architecture whose edited projection routes.

vLLM imports this module by qualified name in its API process, engine core and every worker, after the
``vllm.general_plugins`` entry point (:func:`register`) has named the architectures. ``WiseLlamaForCausalLM``
is vLLM's own ``LlamaForCausalLM`` with one change made inside ``__init__`` (vLLM records layer metadata right
after construction): the edited projection (``hf_config.wise_layer`` / ``wise_module``, e.g.
``model.layers.23.mlp.down_proj``) becomes a :class:`WiseRoutedProjection`. That module owns its tensors
(vLLM's CPU backend repacks its own Linear layers after loading, so they cannot be changed in place):

- ``weight``: the main memory, loaded by name from the pretrained checkpoint;
- shards layout: ``deltas`` (capacity, d_out, d_in) and ``thresholds`` (capacity,), filled by a publish
  (:mod:`serving.vllm_worker`), of which the first ``count`` are live;
- keyed layout: ``table_t`` (the residual blocks, transposed and stacked) and the routing table.

Routing follows :func:`wise.publish.keyed_flat` / :func:`wise.publish.route_flat`: vLLM lays the batch's
sequences end to end; the forward context's ``query_start_loc`` gives the segments. A prefill routes on its whole
prompt and stores the route under the request's first KV-cache block; its decode steps read it back
(:class:`wise.publish.Hold`), so a generation keeps the route its prompt chose, as the evaluator measures it.
The keyed router reads the token ids, which the model's ``forward`` hands to this module, and, for a state keyed by
the residual stream (``wise.keyed.relation_key: residual``), the edited decoder layer's input, which vLLM passes
as ``hidden_states`` plus the ``residual`` it has not added yet (a hook on that layer keeps both). Prefix caching and
chunked prefill must be off (the serving replica turns them off): both would split a prompt's route.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from wise.publish import REDUCTIONS, Hold, keyed_flat, route_flat

logger = logging.getLogger(__name__)

ARCHITECTURES = {"WiseLlamaForCausalLM": "LlamaForCausalLM"}


def register() -> None:
    """``vllm.general_plugins`` entry point: make the routed architectures known to vLLM (lazily, by name)."""
    from vllm import ModelRegistry

    for name in ARCHITECTURES:
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"serving.vllm_model:{name}")


class WiseRoutedProjection(nn.Module):
    """The edited projection with routed side memories, for vLLM's flattened token layout.

    Args:
        in_features / out_features: the projection's shape (weight is (out, in)).
        dtype: the model's dtype.
        attn_layer: name of the attention layer whose metadata gives the sequence boundaries.
        reduce: router reduction over a segment's tokens (shards layout).
        capacity: side-memory slots allocated up front (grown by a publish that needs more; shards layout).
        layout: ``keyed`` or ``shards``, as the published states.
    """

    HELD_SLOTS = 1 << 20  # routes kept per first KV block (index modulo this)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        attn_layer: str,
        reduce: str = "mean",
        capacity: int = 8,
        layout: str = "shards",
    ) -> None:
        super().__init__()
        if reduce not in REDUCTIONS:
            raise ValueError(f"wise_reduce {reduce!r}: choose one of {list(REDUCTIONS)}")
        if layout not in ("keyed", "shards"):
            raise ValueError(f"wise_layout {layout!r}: choose one of ['keyed', 'shards']")
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.register_buffer("deltas", torch.zeros(capacity, out_features, in_features, dtype=dtype))
        # thresholds in float32 whatever the model dtype (construction runs under the model's default dtype)
        self.register_buffer("thresholds", torch.full((capacity,), float("inf"), dtype=torch.float32))
        self.attn_layer = attn_layer
        self.reduce = reduce
        self.layout = layout
        # keyed layout: blocks transposed and stacked, and the routing table (wise.publish.keyed_routing)
        self.register_buffer("table_t", torch.zeros(0, out_features, dtype=dtype), persistent=False)
        self.routing_table: dict[str, torch.Tensor] = {}
        self.max_len = 1
        self.min_similarity: float | None = None
        self.register_buffer("held", torch.full((self.HELD_SLOTS,), -1, dtype=torch.long), persistent=False)
        self.input_ids: torch.Tensor | None = None  # set by the model's forward (the keyed router reads them)
        self.relation_key = "mean"  # keyed: what the published relation keys read (wise.keyed.relation_key)
        # the edited decoder layer's (hidden_states, residual) of this forward, kept by _install_routed's hook
        self.block_parts: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.count = 0  # live memories: the first `count` slots
        self.version = 0  # the published version this module serves (0: none, main memory only)
        self.ids: list[str] = []
        self.routing = True

    def _metadata(self):
        """The attention metadata of this forward; None during profiling and dummy runs."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return None
        meta = get_forward_context().attn_metadata
        if isinstance(meta, list):  # dual-batch overlap: one dict per micro-batch; not used with routing
            meta = meta[0] if meta else None
        if not meta:
            return None
        return meta.get(self.attn_layer) or next(iter(meta.values()))

    def _hold(self, entry) -> Hold | None:
        seq_lens, blocks = getattr(entry, "seq_lens", None), getattr(entry, "block_table", None)
        if seq_lens is None or blocks is None or blocks.dim() != 2:
            return None  # a backend without them: every segment routes on its own tokens
        return Hold(seq_lens, blocks[:, 0], self.held)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = x @ self.weight.T  # (N, d_out) main memory
        if self.count == 0 or not self.routing:
            return out, None
        entry = self._metadata()
        if entry is None:
            return out, None
        starts, hold = entry.query_start_loc, self._hold(entry)
        if self.layout == "keyed":
            if self.input_ids is None:
                return out, None
            ids = self.input_ids[: x.shape[0]]
            last = self._last_block_inputs(starts) if self.relation_key == "residual" else None
            extra = keyed_flat(
                x,
                ids,
                starts,
                self.routing_table,
                self.max_len,
                self.table_t,
                self.min_similarity,
                hold,
                last,
            )
        else:
            extra = route_flat(
                x, self.deltas[: self.count], self.thresholds[: self.count], starts, self.reduce, hold
            )
        return out + extra.to(out.dtype), None

    def _last_block_inputs(self, starts: torch.Tensor) -> torch.Tensor:
        """(R, h) the edited block's input (the residual stream) at each segment's last token."""
        if self.block_parts is None:
            raise RuntimeError("residual relation keys need the edited decoder layer's input (no hook ran)")
        hidden, residual = self.block_parts
        last = (starts[1:].to(hidden.device, torch.long) - 1).clamp(min=0)
        h = hidden[last].float()
        return h if residual is None else h + residual[last].float()

    @torch.no_grad()
    def install_keyed(
        self,
        ids: list[str],
        new: dict[str, torch.Tensor],
        routing: dict[str, torch.Tensor],
        max_len: int,
        min_similarity: float | None,
        version: int,
        relation_key: str = "mean",
    ) -> None:
        """Make ``ids`` the live blocks (held ones reused, ``new`` ones copied in) with the routing table
        ``routing``, whose relation keys read ``relation_key``. Raises ``KeyError`` for an id neither held nor
        sent."""
        d_in = self.weight.shape[1]
        held = {mid: i for i, mid in enumerate(self.ids)}
        missing = [m for m in ids if m not in held and m not in new]
        if missing:
            raise KeyError(f"memories {missing[:3]} are neither held by this replica nor in the package")
        parts = []
        for mid in ids:
            if mid in new:
                src = new[mid]
                if tuple(src.shape) != tuple(self.weight.shape):
                    raise ValueError(
                        f"memory {mid} has shape {tuple(src.shape)}, not {tuple(self.weight.shape)}"
                    )
                parts.append(src.T.to(self.table_t.device, self.table_t.dtype))
            else:
                i = held[mid]
                parts.append(self.table_t[i * d_in : (i + 1) * d_in])
        dev = self.weight.device
        table = {
            "columns": routing["columns"].to(dev, torch.long),
            "memory_of": routing["memory_of"].to(dev, torch.long),
            "relkeys": routing["relkeys"].to(dev, torch.float32),
            "subject_keys": routing["subject_keys"].to(dev, torch.int64),
            "subject_groups": routing["subject_groups"].to(dev, torch.long),
            "projection": routing["projection"].to(dev, torch.float32),
            "center": routing["center"].to(dev, torch.float32),
        }
        if "name_flags" in routing:
            table["name_flags"] = routing["name_flags"].to(dev, torch.uint8)
        if "values" in routing:
            table["values"] = routing["values"].to(dev, self.table_t.dtype)
        self.table_t = torch.cat(parts).contiguous() if parts else self.table_t[:0]
        self.routing_table, self.max_len, self.min_similarity = table, int(max_len), min_similarity
        self.relation_key = relation_key
        self.count, self.ids, self.version = len(ids), list(ids), int(version)

    @torch.no_grad()
    def install(self, ids: list[str], thresholds: torch.Tensor, new: dict[str, torch.Tensor], version: int):
        """Make ``ids`` the live memories: reuse held ones, copy ``new`` ones in; tensors are changed in place
        while the capacity suffices (grown otherwise). Raises ``KeyError`` for an id neither held nor sent."""
        held = {mid: i for i, mid in enumerate(self.ids)}
        missing = [m for m in ids if m not in held and m not in new]
        if missing:
            raise KeyError(f"memories {missing[:3]} are neither held by this replica nor in the package")
        rows = []
        for mid in ids:
            src = new[mid] if mid in new else self.deltas[held[mid]]
            if tuple(src.shape) != tuple(self.deltas.shape[1:]):
                raise ValueError(
                    f"memory {mid} has shape {tuple(src.shape)}, not {tuple(self.deltas.shape[1:])}"
                )
            rows.append(src.to(self.deltas.device, self.deltas.dtype))
        k = len(ids)
        stacked = torch.stack(rows) if rows else self.deltas[:0].clone()
        if k > self.deltas.shape[0]:
            cap = max(k, 2 * self.deltas.shape[0])
            self.deltas = torch.zeros(
                cap, *self.deltas.shape[1:], dtype=self.deltas.dtype, device=self.deltas.device
            )
            self.thresholds = torch.full((cap,), float("inf"), dtype=torch.float32, device=self.deltas.device)
        self.deltas[:k].copy_(stacked)
        self.thresholds[:k].copy_(thresholds.to(torch.float32))
        self.thresholds[k:].fill_(float("inf"))
        self.count, self.ids, self.version = k, list(ids), int(version)


def _install_routed(model: nn.Module, config) -> WiseRoutedProjection:
    layer = int(config.wise_layer)
    module = getattr(config, "wise_module", "mlp.down_proj") or "mlp.down_proj"
    parent_path, _, leaf = f"model.layers.{layer}.{module}".rpartition(".")
    parent = model.get_submodule(parent_path)
    stock = getattr(parent, leaf)
    out_f, in_f = int(stock.output_size), int(stock.input_size)
    if getattr(stock, "tp_size", 1) != 1:
        raise NotImplementedError(
            "tensor parallelism shards the edited projection's input; routing needs the all-reduced "
            "activation norm (see docs/serving.md, 'On GPU'): run with tensor_parallel_size=1"
        )
    routed = WiseRoutedProjection(
        in_f,
        out_f,
        torch.get_default_dtype(),
        attn_layer=f"model.layers.{layer}.self_attn.attn",
        reduce=getattr(config, "wise_reduce", "mean"),
        capacity=int(getattr(config, "wise_capacity", 8)),
        layout=getattr(config, "wise_layout", "shards"),
    )
    setattr(parent, leaf, routed)

    def keep_block_input(_module, args, kwargs) -> None:
        # LlamaDecoderLayer.forward(positions, hidden_states, residual): the layer's input is their sum
        parts = [*args[1:3], *(kwargs.get(k) for k in ("hidden_states", "residual") if k in kwargs)]
        routed.block_parts = (parts[0], parts[1] if len(parts) > 1 else None)

    if routed.layout == "keyed":  # only the keyed router reads relation keys from the residual stream
        model.get_submodule(f"model.layers.{layer}").register_forward_pre_hook(
            keep_block_input, with_kwargs=True
        )
    logger.info("WISE routing installed at model.layers.%d.%s (%d x %d)", layer, module, out_f, in_f)
    return routed


def _routed_class(base_name: str) -> type:
    import vllm.model_executor.models.llama as llama  # only Llama-family bases so far

    base = getattr(llama, base_name)

    class Routed(base):
        def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            self.wise_routed = _install_routed(self, vllm_config.model_config.hf_config)

        def forward(self, input_ids, positions, *args, **kwargs):
            self.wise_routed.input_ids = input_ids  # the keyed router routes on the query's tokens
            return super().forward(input_ids, positions, *args, **kwargs)

    return Routed


def __getattr__(name: str) -> type:
    # vLLM resolves "serving.vllm_model:WiseLlamaForCausalLM" with getattr: build the class on first use, so
    # importing this module (e.g. for register()) does not import vLLM's model code.
    if name in ARCHITECTURES:
        cls = _routed_class(ARCHITECTURES[name])
        cls.__name__ = cls.__qualname__ = name
        globals()[name] = cls
        return cls
    raise AttributeError(name)
