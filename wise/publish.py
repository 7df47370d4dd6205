"""What a serving engine needs of a WISE state, and how it travels (paper Sec. 2.3.1, Eq. 4 at serving time).

A serving engine holds the main weight of the edited projection (the pretrained checkpoint's) plus a list of
side memories (task vectors ``Delta_k``) and what routes among them: thresholds (shards layout) or the keyed
routing table (keyed layout). :class:`ServingSnapshot` is that, each memory named by a content id so that a
publish moves only the memories a replica does not hold yet. :func:`encode_package` / :func:`decode_package`
are the wire format (safetensors bytes with a JSON header: never pickle). :func:`keyed_flat` and
:func:`route_flat` are the routing rules on vLLM's flattened token dimension: one route per sequence segment,
decided on the prompt at prefill and held through the decode steps (:class:`Hold`), as the evaluator does.
No ``vllm`` or ``ray`` import here: the rules are tested against the Hugging Face routers directly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from wise.config import KeyedConfig
from wise.memory import Memory

PACKAGE_FORMAT = 1
REDUCTIONS = ("mean", "max", "last")
RELATION_KEYS = ("mean", "residual")


class PublishError(ValueError):
    """A package that cannot be applied (wrong format, a memory the replica lacks, a shape mismatch)."""


def memory_id(mem: Memory) -> str:
    """Content id of a side memory: its edits, shards and a hash of its task vector's bytes.

    Two memories with the same id are interchangeable, so a replica that holds one never receives it again.
    """
    h = hashlib.blake2b(digest_size=10)
    h.update(json.dumps([mem.edit_ids, mem.shard_ids]).encode())
    h.update(mem.delta.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ServingSnapshot:
    """The routed side memories of one state, in the router's order, and what routing among them needs.

    Attributes:
        module_path: the edited projection (``model.layers.23.mlp.down_proj``).
        reduce: shards layout: how per-token activations become a sequence score (``mean``, ``max``, ``last``).
        ids: content id per memory.
        deltas: (K, d_out, d_in) task vectors (keyed layout: the residual blocks).
        thresholds: (K,) float32 routing thresholds (shards layout; keyed: zeros).
        n_edits: edits the memories hold.
        edit_ids: the ids of those edits (freshness is measured per edit).
        layout: ``shards`` or ``keyed``.
        routing: keyed layout: the routing table (:func:`keyed_routing`), sent whole with every publish.
        max_len / min_similarity: keyed layout: the longest subject in tokens, and the relation gate.
        relation_key: keyed layout: what a query's relation key reads (``wise.keyed.relation_key``): ``mean``,
            the edited projection's input; ``residual``, the edited block's input at the prompt's last token.
    """

    module_path: str
    reduce: str
    ids: tuple[str, ...]
    deltas: torch.Tensor
    thresholds: torch.Tensor
    n_edits: int
    edit_ids: tuple[str, ...] = ()
    layout: str = "shards"
    routing: dict[str, torch.Tensor] = field(default_factory=dict)
    max_len: int = 1
    min_similarity: float | None = None
    relation_key: str = "mean"

    @classmethod
    def from_memories(cls, module_path: str, reduce: str, memories: Iterable[Memory]) -> ServingSnapshot:
        """A shards-layout snapshot (each memory routed by its threshold)."""
        mems = [m for m in memories if m.edit_ids]
        if not mems:
            raise PublishError("the state holds no side memory with an edit: nothing to serve")
        return cls(
            module_path=module_path,
            reduce=reduce,
            ids=tuple(memory_id(m) for m in mems),
            deltas=torch.stack([m.delta.detach().cpu() for m in mems]),
            thresholds=torch.tensor([m.threshold for m in mems], dtype=torch.float32),
            n_edits=sum(len(m.edit_ids) for m in mems),
            edit_ids=tuple(e for m in mems for e in m.edit_ids),
        )

    @classmethod
    def keyed(
        cls,
        module_path: str,
        memories: Iterable[Memory],
        projection: torch.Tensor,
        center: torch.Tensor | None,
        min_similarity: float | None = None,
        name_flags: torch.Tensor | None = None,
        relation_key: str = "mean",
    ) -> ServingSnapshot:
        """A keyed-layout snapshot: the blocks (and pending shards) plus the routing table of their live edits
        (an edit whose prompt a later edit repeats is left out); ``name_flags``: the whole-name rule's
        vocabulary flags (:mod:`wise.keyed.names`), None when it is off; ``relation_key``: what the
        ``projection`` reads (the edited projection's input, or the edited block's with ``residual``)."""
        from wise.keyed.editor import live_memories

        mems = [m for m in live_memories(list(memories)) if m.edit_ids]
        if not mems:
            raise PublishError("the state holds no side memory with an edit: nothing to serve")
        routing, max_len = keyed_routing(mems, projection, center)
        if name_flags is not None:
            routing["name_flags"] = name_flags.to(torch.uint8).cpu()
        return cls(
            module_path=module_path,
            reduce="mean",
            ids=tuple(memory_id(m) for m in mems),
            deltas=torch.stack([m.delta.detach().cpu() for m in mems]),
            thresholds=torch.zeros(len(mems), dtype=torch.float32),
            n_edits=sum(len(m.edit_ids) for m in mems),
            edit_ids=tuple(e for m in mems for e in m.edit_ids),
            layout="keyed",
            routing=routing,
            max_len=max_len,
            min_similarity=min_similarity,
            relation_key=relation_key,
        )

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> ServingSnapshot:
        """The memories a router chooses among in a state written by :func:`wise.state.compose_state`:
        merged, pending, then the active shard if it holds edits."""
        return snapshot_of(meta["config"], meta["module_path"], state_memories(tensors, meta), meta)

    def nbytes(self) -> dict[str, int]:
        """What the edited layer holds to route and answer, in bytes: ``memories`` (the task vectors) and
        ``routing`` (thresholds, or the keyed routing table)."""
        routing = (
            sum(t.numel() * t.element_size() for t in self.routing.values())
            if self.layout == "keyed"
            else self.thresholds.numel() * 4
        )
        return {"memories": self.deltas.numel() * self.deltas.element_size(), "routing": routing}


def state_memories(tensors: dict[str, torch.Tensor], meta: dict) -> list[Memory]:
    """The memories of a state written by :func:`wise.state.compose_state` in the router's order: merged,
    pending, then the active shard (a snapshot leaves it out while it holds no edit)."""
    mems = [Memory.from_state(tensors, f"merged.{i}", m) for i, m in enumerate(meta["merged"])]
    mems += [Memory.from_state(tensors, f"pending.{i}", m) for i, m in enumerate(meta["pending"])]
    mems.append(Memory.from_state(tensors, "active", meta["active"]))
    return mems


def snapshot_of(config: dict, module_path: str, memories: list[Memory], setup: dict) -> ServingSnapshot:
    """The snapshot of ``memories`` for the layout ``config`` (a dumped :class:`~wise.config.WiseConfig`),
    ``setup`` holding the keyed layout's relation ``center`` and ``name_flags`` (what the trainers share)."""
    if config.get("layout", "shards") == "keyed":
        from wise.keyed.names import decode_flags
        from wise.keyed.trainer import key_projection

        keyed = KeyedConfig.model_validate(config["keyed"])
        d_in = memories[0].delta.shape[1] if memories else 0
        width = setup.get("key_width", 0)
        if keyed.relation_key == "residual" and not width:
            raise PublishError("a residual-keyed state without its key_width: save it again to publish it")
        proj = key_projection(keyed, config["seed"], d_in, width)

        center, flags = setup.get("center"), setup.get("name_flags")
        return ServingSnapshot.keyed(
            module_path,
            memories,
            proj,
            None if center is None else torch.tensor(center, dtype=torch.float32),
            keyed.min_similarity,
            None if flags is None or not keyed.whole_names else decode_flags(flags),
            keyed.relation_key,
        )
    return ServingSnapshot.from_memories(module_path, config["router_reduce"], memories)


def keyed_routing(
    mems: list[Memory], projection: torch.Tensor, center: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], int]:
    """The keyed routing table of ``mems`` as tensors (and the longest subject): ``columns`` (E, k),
    ``memory_of`` (E,), ``relkeys`` (E, r), ``subject_keys`` (G,) / ``subject_groups`` (G, W) (the
    :class:`~wise.keyed.table.SubjectTable`), ``projection`` (d_in, r), ``center`` (r,) and, with
    ``keyed.values``, ``values`` (E, d_out)."""
    from wise.keyed.table import SubjectTable

    table = SubjectTable.build([s for m in mems for s in m.subjects])
    routing = {
        "columns": torch.cat([m.columns for m in mems]).to(torch.int32),  # type: ignore[misc]
        "memory_of": torch.cat(
            [torch.full((len(m.edit_ids),), j, dtype=torch.int32) for j, m in enumerate(mems)]
        ),
        "relkeys": torch.cat([m.relkeys for m in mems]).to(torch.float16),  # type: ignore[misc]
        "subject_keys": table.keys,
        "subject_groups": table.groups.to(torch.int32),
        "projection": projection.to(torch.float16).contiguous(),
        "center": (torch.zeros(projection.shape[1]) if center is None else center).to(torch.float32),
    }
    if all(m.values is not None for m in mems):  # keyed.values: each edit's own output vector
        routing["values"] = torch.cat([m.values for m in mems]).to(torch.float16)  # type: ignore[misc]
    return routing, table.max_len


def encode_package(snapshot: ServingSnapshot, version: int, held: Iterable[str] = ()) -> bytes:
    """Serialise a publish of ``snapshot`` as ``version`` for a replica that already holds ``held`` ids.

    Only the memories not in ``held`` travel; the thresholds (shards) or the routing table (keyed) always do.
    """
    held = set(held)
    tensors = {"thresholds": snapshot.thresholds.contiguous()}
    tensors.update({f"routing.{k}": v.contiguous() for k, v in snapshot.routing.items()})
    sent = []
    for i, mid in enumerate(snapshot.ids):
        if mid not in held:
            tensors[f"delta.{mid}"] = snapshot.deltas[i].contiguous()
            sent.append(mid)
    header = {
        "format": PACKAGE_FORMAT,
        "version": int(version),
        "module_path": snapshot.module_path,
        "layout": snapshot.layout,
        "reduce": snapshot.reduce,
        "ids": list(snapshot.ids),
        "sent": sent,
        "n_edits": snapshot.n_edits,
        "max_len": snapshot.max_len,
        "min_similarity": snapshot.min_similarity,
        "relation_key": snapshot.relation_key,
    }
    return st_save(tensors, metadata={"wise": json.dumps(header)})


KEYED_TABLE = ("columns", "memory_of", "relkeys", "subject_keys", "subject_groups", "projection", "center")


def decode_package(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) of a package; raises :class:`PublishError` on anything else."""
    try:
        tensors = st_load(data)
        header = json.loads(_metadata(data)["wise"])
    except Exception as err:  # noqa: BLE001 - any parse failure is the same user-facing error
        raise PublishError(f"not a wisestream publish package: {err}") from err
    if header.get("format") != PACKAGE_FORMAT:
        raise PublishError(f"package format {header.get('format')} is not {PACKAGE_FORMAT}")
    if header.get("layout") not in ("shards", "keyed"):
        raise PublishError(
            f"unknown memory layout {header.get('layout')!r}; choose one of ['keyed', 'shards']"
        )
    if header["reduce"] not in REDUCTIONS:
        raise PublishError(f"unknown router reduction {header['reduce']!r}; choose one of {list(REDUCTIONS)}")
    if tensors["thresholds"].shape != (len(header["ids"]),):
        raise PublishError(
            f"{len(header['ids'])} memories but thresholds {tuple(tensors['thresholds'].shape)}"
        )
    if header.setdefault("relation_key", "mean") not in RELATION_KEYS:
        raise PublishError(
            f"unknown relation key {header['relation_key']!r}; choose one of {list(RELATION_KEYS)}"
        )
    if header["layout"] == "keyed":
        missing = [k for k in KEYED_TABLE if f"routing.{k}" not in tensors]
        if missing:
            raise PublishError(f"keyed package without its routing table: {missing}")
        n = tensors["routing.columns"].shape[0]
        if tensors["routing.memory_of"].shape != (n,) or tensors["routing.relkeys"].shape[0] != n:
            raise PublishError("keyed routing table: columns, memory_of and relkeys disagree on the edits")
        if "routing.values" in tensors and tensors["routing.values"].shape[0] != n:
            raise PublishError("keyed routing table: values and columns disagree on the edits")
    return header, tensors


def _metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


@dataclass
class Hold:
    """What keeps a sequence's route from its prefill through its decode steps in a flattened batch.

    vLLM gives no request ids to the model, but each running request owns its KV-cache blocks: the first one
    names it. A prefill segment (its query is its whole sequence: prefix caching and chunked prefill are off)
    stores its route under that block; a decode segment reads it back. Pure tensor operations, no host sync.

    Attributes:
        seq_lens: (R,) tokens of each sequence so far (its prompt plus what it generated).
        first_block: (R,) its first KV-cache block.
        held: (H,) long, the route stored per block (index ``first_block % H``); updated in place.
    """

    seq_lens: torch.Tensor
    first_block: torch.Tensor
    held: torch.Tensor

    def apply(self, choice: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """The routes to use: ``choice`` (R,) for prefill segments (stored), the held one for decode ones."""
        r = choice.shape[0]
        query = starts[1 : r + 1] - starts[:r]
        prefill = query >= self.seq_lens[:r].to(query.device)
        slot = self.first_block[:r].to(choice.device, torch.long) % self.held.numel()
        held = self.held.to(choice.device)
        out = torch.where(prefill, choice, held[slot])
        self.held.scatter_(0, slot.to(self.held.device), out.to(self.held.device))
        return out


def keyed_flat(
    x: torch.Tensor,
    ids: torch.Tensor,
    starts: torch.Tensor,
    table: dict[str, torch.Tensor],
    max_len: int,
    table_t: torch.Tensor,
    min_similarity: float | None = None,
    hold: Hold | None = None,
    last_inputs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The keyed layout's contribution for a flattened batch (vLLM's layout): each segment routes on its
    tokens by subject (:func:`wise.keyed.table.route`), decode segments keep their prefill's route (``hold``).

    Args:
        x: (N, d_in) inputs of the edited projection; tokens past ``starts[-1]`` are padding.
        ids: (N,) their token ids.
        starts: (R + 1,) segment boundaries (``query_start_loc``).
        table: the routing tensors of :func:`keyed_routing` (on ``x``'s device, ``columns``/``memory_of`` long,
            ``subject_groups`` long), with ``name_flags`` when the whole-name rule is on.
        max_len: the longest subject variant, in tokens.
        table_t: (K * d_in, d_out) the memories transposed and stacked.
        min_similarity: the relation gate (None: off).
        hold: keep decode segments on their prefill's route (None: route every segment on its own tokens).
        last_inputs: (R, h) the edited block's input at each segment's last token, for a table keyed by it
            (``relation_key: residual``; None: the relation key reads ``x``).

    Returns:
        (N, d_out) to add to the main memory's output.
    """
    from wise.keyed.table import SubjectTable, residual, route

    n = x.shape[0]
    starts = starts.to(x.device, torch.long)
    r = starts.numel() - 1
    pos = torch.arange(n, device=x.device)
    seg = torch.searchsorted(starts[1:], pos, right=True)  # (N,) r = padding
    res = route(
        ids.to(x.device),
        x,
        seg,
        pos < starts[-1],
        r + 1,
        SubjectTable(table["subject_keys"], table["subject_groups"], max_len),
        table["relkeys"],
        table["projection"],
        table["center"],
        min_similarity,
        table.get("name_flags"),
        None
        if last_inputs is None
        else torch.cat([last_inputs, last_inputs.new_zeros(1, last_inputs.shape[1])]),
    )
    choice = res.choice[:r]
    if hold is not None:
        choice = hold.apply(choice, starts)
    per_token = torch.cat([choice, choice.new_full((1,), -1)])[seg]
    return residual(x, per_token, table["columns"], table["memory_of"], table_t, table.get("values"))


def route_flat(
    x: torch.Tensor,
    deltas: torch.Tensor,
    thresholds: torch.Tensor,
    starts: torch.Tensor | None,
    reduce: str = "mean",
    hold: Hold | None = None,
) -> torch.Tensor:
    """The side-memory contribution for a flattened batch of sequences (Eq. 4, routed per segment).

    Args:
        x: (N, d_in) inputs of the edited projection for N tokens of R sequences laid end to end (vLLM's
            layout); tokens past ``starts[-1]`` are padding and get no contribution.
        deltas: (K, d_out, d_in) side-memory task vectors, K >= 1.
        thresholds: (K,) float32 routing thresholds.
        starts: (R + 1,) segment boundaries (vLLM's ``query_start_loc``); None treats all N tokens as one
            sequence.
        reduce: per-token activations to a sequence score: ``mean``, ``max`` or ``last``.
        hold: keep decode segments on their prefill's route (None: route every segment on its own tokens).

    Returns:
        (N, d_out) to add to the main memory's output: ``Delta_k x_t`` for the tokens of sequences whose best
        score / threshold reaches 1 (k the best memory), zero elsewhere. No host synchronisation.
    """
    n = x.shape[0]
    k = deltas.shape[0]
    side = torch.einsum("nd,kod->kno", x, deltas)  # (K, N, d_out): every memory's output on every token
    act = side.float().norm(dim=-1)  # (K, N) per-token routing activation ||Delta_k x_t||
    if starts is None:
        starts = torch.tensor([0, n], device=x.device)
    starts = starts.to(x.device, torch.long)
    r = starts.numel() - 1
    pos = torch.arange(n, device=x.device)
    seg = torch.searchsorted(starts[1:], pos, right=True)  # (N,) segment per token; r = padding
    if reduce == "last":
        last = (starts[1:] - 1).clamp(min=0)  # (R,)
        scores = act[:, last]  # (K, R)
    elif reduce in ("mean", "max"):
        how = "mean" if reduce == "mean" else "amax"
        scores = torch.zeros(k, r + 1, device=x.device, dtype=act.dtype)
        scores = scores.scatter_reduce(1, seg.unsqueeze(0).expand(k, n), act, how, include_self=False)[:, :r]
    else:
        raise ValueError(f"unknown router reduction {reduce!r}; choose one of {list(REDUCTIONS)}")
    ratio = scores / thresholds.to(x.device).clamp(min=1e-12).unsqueeze(1)  # (K, R)
    best_ratio, best = ratio.max(dim=0)  # (R,)
    choice = torch.where(best_ratio >= 1.0, best, torch.full_like(best, -1))  # (R,)
    if hold is not None:
        choice = hold.apply(choice, starts)
    per_token = torch.cat([choice, choice.new_full((1,), -1)])[seg]  # (N,) padding -> main memory
    picked = side[per_token.clamp(min=0), pos]  # (N, d_out)
    return picked * (per_token >= 0).to(picked.dtype).unsqueeze(1)


__all__ = [
    "Hold",
    "PublishError",
    "ServingSnapshot",
    "decode_package",
    "encode_package",
    "keyed_flat",
    "keyed_routing",
    "memory_id",
    "route_flat",
    "snapshot_of",
    "state_memories",
]
