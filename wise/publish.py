"""What a serving engine needs of a WISE state, and how it travels (paper Sec. 2.3.1, Eq. 4 at serving time).

A serving engine holds the main weight of the edited projection (the pretrained checkpoint's) plus a list of
side memories (task vectors ``Delta_k``) and their routing thresholds. :class:`ServingSnapshot` is that list,
each memory named by a content id so that a publish moves only the memories a replica does not hold yet.
:func:`encode_package` / :func:`decode_package` are the wire format (safetensors bytes with a JSON header:
never pickle). :func:`route_flat` is the routing rule on vLLM's flattened token dimension: one score per
sequence segment, so a prefill segment routes on its whole prompt and a decode segment (one token) on itself.
No ``vllm`` or ``ray`` import here: the rule is tested against :class:`~wise.router.RoutedLinear` directly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from wise.memory import Memory

PACKAGE_FORMAT = 1
REDUCTIONS = ("mean", "max", "last")


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
    """The routed side memories of one WISE state, in the router's order.

    Attributes:
        module_path: the edited projection (``model.layers.23.mlp.down_proj``).
        reduce: how per-token activations become a sequence score (``mean``, ``max``, ``last``).
        ids: content id per memory.
        deltas: (K, d_out, d_in) task vectors.
        thresholds: (K,) float32 routing thresholds.
        n_edits: edits the memories hold.
        edit_ids: the ids of those edits (freshness is measured per edit).
    """

    module_path: str
    reduce: str
    ids: tuple[str, ...]
    deltas: torch.Tensor
    thresholds: torch.Tensor
    n_edits: int
    edit_ids: tuple[str, ...] = ()

    @classmethod
    def from_memories(cls, module_path: str, reduce: str, memories: Iterable[Memory]) -> ServingSnapshot:
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
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> ServingSnapshot:
        """The memories a router chooses among in a state written by :func:`wise.editor.compose_state`:
        merged, pending, then the active shard if it holds edits."""
        mems = [Memory.from_state(tensors, f"merged.{i}", m) for i, m in enumerate(meta["merged"])]
        mems += [Memory.from_state(tensors, f"pending.{i}", m) for i, m in enumerate(meta["pending"])]
        mems.append(Memory.from_state(tensors, "active", meta["active"]))
        return cls.from_memories(meta["module_path"], meta["config"]["router_reduce"], mems)


def encode_package(snapshot: ServingSnapshot, version: int, held: Iterable[str] = ()) -> bytes:
    """Serialise a publish of ``snapshot`` as ``version`` for a replica that already holds ``held`` ids.

    Only the memories not in ``held`` travel; the thresholds (K floats) always do, since merges refresh them.
    """
    held = set(held)
    tensors = {"thresholds": snapshot.thresholds.contiguous()}
    sent = []
    for i, mid in enumerate(snapshot.ids):
        if mid not in held:
            tensors[f"delta.{mid}"] = snapshot.deltas[i].contiguous()
            sent.append(mid)
    header = {
        "format": PACKAGE_FORMAT,
        "version": int(version),
        "module_path": snapshot.module_path,
        "reduce": snapshot.reduce,
        "ids": list(snapshot.ids),
        "sent": sent,
        "n_edits": snapshot.n_edits,
    }
    return st_save(tensors, metadata={"wise": json.dumps(header)})


def decode_package(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) of a package; raises :class:`PublishError` on anything else."""
    try:
        tensors = st_load(data)
        header = json.loads(_metadata(data)["wise"])
    except Exception as err:  # noqa: BLE001 - any parse failure is the same user-facing error
        raise PublishError(f"not a wisestream publish package: {err}") from err
    if header.get("format") != PACKAGE_FORMAT:
        raise PublishError(f"package format {header.get('format')} is not {PACKAGE_FORMAT}")
    if header["reduce"] not in REDUCTIONS:
        raise PublishError(f"unknown router reduction {header['reduce']!r}; choose one of {list(REDUCTIONS)}")
    if tensors["thresholds"].shape != (len(header["ids"]),):
        raise PublishError(
            f"{len(header['ids'])} memories but thresholds {tuple(tensors['thresholds'].shape)}"
        )
    return header, tensors


def _metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


def route_flat(
    x: torch.Tensor,
    deltas: torch.Tensor,
    thresholds: torch.Tensor,
    starts: torch.Tensor | None,
    reduce: str = "mean",
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
    per_token = torch.cat([choice, choice.new_full((1,), -1)])[seg]  # (N,) padding -> main memory
    picked = side[per_token.clamp(min=0), pos]  # (N, d_out)
    return picked * (per_token >= 0).to(picked.dtype).unsqueeze(1)


__all__ = [
    "PublishError",
    "ServingSnapshot",
    "decode_package",
    "encode_package",
    "memory_id",
    "route_flat",
]
