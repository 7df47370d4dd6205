"""Keyed routing: which edit, if any, answers a query (the bounded layout's router, used by the evaluator, the
single-process editor and the vLLM replicas alike).

An edit is keyed by its **subject**: the token sequences of the subject string as it appears mid-sentence
(``" Eiffel Tower"``) and at the start of a prompt (``"Eiffel Tower"``). A query routes to an edit when its query
span (the prompt a user sends) contains one of those token sequences contiguously; the longest subject found
wins (``Microsoft Office`` over ``Microsoft``), and when several edits share that subject (the same entity
edited for several relations), the one whose **relation key** is nearest to the query's wins. The relation key
is the mean activation at the edited layer of the prompt's tokens other than the subject's (or, with
``keyed.relation_key: residual``, the residual stream entering the edited block at the prompt's last token),
centred on unrelated prompts and projected to a few hundred dimensions; ``min_similarity`` can refuse a query
whose relation is too far from the edit's (a question about another fact of the same subject). With ``name_flags``, a subject found
inside a longer name (``"Ireland"`` in ``"Jill Ireland"``) does not match (:mod:`wise.keyed.names`).

Why subjects and not the side memory's activation (WISE's router): on the embedded model the activation of
a rephrase and of a same-relation prompt about a neighbouring subject overlap, so no threshold separates
generalisation from near-miss locality (measured on the development split, see ``docs/design.md``); a
contiguous subject match keeps both.

Cost: hashing every n-gram (n <= ``max_len``) of the query tokens and one binary search each in a sorted table:
O(N x max_len x log V) for N tokens and V subject variants, independent of the side memories' size, with no
host synchronisation. Two moduli keep false matches below 1e-12 per lookup.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wise.keyed.names import inside_name

_M1, _B1 = 2_147_483_647, 1_000_003
_M2, _B2 = 2_147_483_629, 999_983


def variant_hash(tokens: Sequence[int]) -> int:
    """The table key of one subject variant (the same polynomial hash :func:`ngram_hashes` computes)."""
    h1 = h2 = 1
    for t in tokens:
        h1 = (h1 * _B1 + t + 1) % _M1
        h2 = (h2 * _B2 + t + 1) % _M2
    return (h1 << 31) | h2


def ngram_hashes(ids: torch.Tensor, max_len: int) -> torch.Tensor:
    """Hash of the n-gram ending at every position, for n = 1..max_len: (N,) -> (N, max_len) int64.

    Column n-1 holds the hash of ``ids[i-n+1 .. i]``; entries whose n-gram would start before position 0 are
    garbage and must be masked by the caller (:func:`run_lengths`).
    """
    t = ids.to(torch.int64) + 1
    one = torch.ones_like(t)
    p1, p2 = one, one  # H_0 = 1 at every position
    out = []
    for _ in range(max_len):
        s1 = torch.cat([one[:1], p1[:-1]])  # H_{n-1}(i-1)
        s2 = torch.cat([one[:1], p2[:-1]])
        p1 = (s1 * _B1 + t) % _M1
        p2 = (s2 * _B2 + t) % _M2
        out.append((p1 << 31) | p2)
    return torch.stack(out, dim=1)


def run_lengths(span: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Length of the run of query-span tokens of the same segment ending at each position (0 off the span).

    Args:
        span: (N,) bool, the query tokens.
        seg: (N,) long, the segment (sequence) of each token; segments are contiguous.
    """
    n = span.shape[0]
    pos = torch.arange(n, device=span.device)
    first = torch.ones(n, dtype=torch.bool, device=span.device)
    first[1:] = seg[1:] != seg[:-1]
    # a run starts right after a token off the span, or at a segment's first token
    starts = torch.where(~span, pos + 1, torch.where(first, pos, torch.full_like(pos, -1)))
    begin = torch.cummax(starts, dim=0).values
    return torch.where(span, pos - begin + 1, torch.zeros_like(pos))


@dataclass
class SubjectTable:
    """Subject variants of the live edits, sorted for binary search.

    Attributes:
        keys: (G,) int64 sorted distinct variant hashes.
        groups: (G, W) long, the entries holding each variant (-1 padding); W is the most edits sharing one.
        max_len: the longest variant, in tokens (the n-grams a query is hashed for).
    """

    keys: torch.Tensor
    groups: torch.Tensor
    max_len: int

    @classmethod
    def build(
        cls, subjects: Sequence[Sequence[Sequence[int]]], device: torch.device | str = "cpu"
    ) -> SubjectTable:
        """Table of ``subjects[e]`` = the token-id variants of entry ``e`` (an entry without any never routes)."""
        owners: dict[int, list[int]] = {}
        max_len = 1
        for e, variants in enumerate(subjects):
            for v in variants:
                if not v:
                    continue
                max_len = max(max_len, len(v))
                lst = owners.setdefault(variant_hash(v), [])
                if e not in lst:
                    lst.append(e)
        keys = sorted(owners)
        width = max((len(owners[k]) for k in keys), default=1)
        groups = torch.full((max(len(keys), 1), width), -1, dtype=torch.long)
        for g, k in enumerate(keys):
            groups[g, : len(owners[k])] = torch.tensor(owners[k])
        key_t = torch.tensor(keys or [-1], dtype=torch.int64)
        return cls(key_t.to(device), groups.to(device), max_len)

    def to(self, device: torch.device | str) -> SubjectTable:
        return SubjectTable(self.keys.to(device), self.groups.to(device), self.max_len)


@dataclass
class RouteResult:
    """Per segment: the answering entry (-1: the main memory), the matched subject length, and the relation
    similarity of the chosen entry (0 where nothing matched)."""

    choice: torch.Tensor  # (R,) long
    length: torch.Tensor  # (R,) long
    similarity: torch.Tensor  # (R,) float32


def segment_means(x: torch.Tensor, seg: torch.Tensor, span: torch.Tensor, n_seg: int) -> torch.Tensor:
    """Mean of ``x`` (N, d) over each segment's span tokens: (R, d) (zero for an empty span)."""
    w = span.to(x.dtype).unsqueeze(1)
    sums = torch.zeros(n_seg, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, seg, x * w)
    counts = torch.zeros(n_seg, dtype=x.dtype, device=x.device).index_add_(0, seg, span.to(x.dtype))
    return sums / counts.clamp(min=1.0).unsqueeze(1)


def last_positions(span: torch.Tensor) -> torch.Tensor:
    """Index of each row's last span token ((B, T) bool -> (B,) long; 0 for an empty span)."""
    pos = torch.arange(span.shape[1], device=span.device).expand_as(span)
    return torch.where(span.bool(), pos, torch.zeros_like(pos)).amax(1)


def relation_vectors(
    means: torch.Tensor, projection: torch.Tensor, center: torch.Tensor | None
) -> torch.Tensor:
    """Unit relation keys from mean activations: ``normalize(means @ projection - center)``: (R, r)."""
    v = means.float() @ projection.float()
    if center is not None:
        v = v - center.float()
    return F.normalize(v, dim=-1)


def route(
    ids: torch.Tensor,
    x: torch.Tensor,
    seg: torch.Tensor,
    span: torch.Tensor,
    n_seg: int,
    table: SubjectTable,
    relkeys: torch.Tensor,
    projection: torch.Tensor,
    center: torch.Tensor | None,
    min_similarity: float | None = None,
    name_flags: torch.Tensor | None = None,
    last_inputs: torch.Tensor | None = None,
) -> RouteResult:
    """Choose the answering entry of every segment of a flattened batch.

    Args:
        ids: (N,) token ids, segments laid end to end.
        x: (N, d_in) inputs of the edited projection.
        seg: (N,) segment of each token (0..R-1, contiguous, non-decreasing).
        span: (N,) bool, each segment's query tokens (its prompt).
        n_seg: R.
        table: the live entries' subject variants.
        relkeys: (E, r) unit relation keys of the entries.
        projection: (d_in, r) relation projection; center: (r,) or None.
        min_similarity: entries whose relation similarity is below this do not answer (None: no gate).
        name_flags: (V,) uint8 :func:`wise.keyed.names.name_flags`: a subject inside a longer name does not
            match (None: every contiguous match counts).
        last_inputs: (R, h) per segment, the residual stream entering the edited block at its last span token
            (``keyed.relation_key: residual``): the relation key reads it instead of the mean of ``x``.

    Returns:
        A :class:`RouteResult`.
    """
    n = ids.shape[0]
    dev = ids.device
    lengths = torch.arange(1, table.max_len + 1, device=dev)  # (L,)
    hashes = ngram_hashes(ids, table.max_len)  # (N, L)
    runs = run_lengths(span, seg)
    valid = lengths.unsqueeze(0) <= runs.unsqueeze(1)  # (N, L)
    pos = torch.searchsorted(table.keys, hashes).clamp(max=table.keys.numel() - 1)  # (N, L)
    hit = valid & (table.keys[pos] == hashes)
    if name_flags is not None:
        hit = hit & ~inside_name(ids, seg, span, runs, table.max_len, name_flags)
    # per token the longest subject ending there, then per segment the longest (ties: the last one)
    tok_len = torch.where(hit, lengths.unsqueeze(0), torch.zeros_like(pos)).amax(1)  # (N,)
    tok_group = pos.gather(1, (tok_len - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,)
    order = tok_len * (n + 1) + torch.arange(n, device=dev)
    best = torch.full((n_seg,), -1, dtype=torch.long, device=dev)
    best = best.scatter_reduce(0, seg, torch.where(tok_len > 0, order, torch.full_like(order, -1)), "amax")
    matched = best >= 0
    length = torch.where(matched, best // (n + 1), torch.zeros_like(best))
    token = torch.where(matched, best % (n + 1), torch.zeros_like(best)).clamp(max=max(n - 1, 0))
    cands = table.groups[tok_group[token]]  # (R, W) entries sharing the longest subject
    cands = torch.where(matched.unsqueeze(1), cands, torch.full_like(cands, -1))
    if last_inputs is not None:
        query = relation_vectors(last_inputs, projection, center)  # (R, r)
    else:
        # the relation is what the query says besides the subject: its span without the matched subject tokens
        pos = torch.arange(n, device=dev)
        last, size = token[seg], length[seg]
        in_subject = (pos <= last) & (pos > last - size)
        rest = span & ~in_subject
        has_rest = torch.zeros(n_seg, dtype=torch.long, device=dev).index_add_(0, seg, rest.long()) > 0
        rest = torch.where(has_rest[seg], rest, span)
        query = relation_vectors(segment_means(x, seg, rest, n_seg), projection, center)  # (R, r)
    sim = (relkeys[cands.clamp(min=0)].float() * query.unsqueeze(1)).sum(-1)  # (R, W)
    sim = torch.where(cands >= 0, sim, torch.full_like(sim, -2.0))
    best_sim, slot = sim.max(dim=1)
    choice = cands.gather(1, slot.unsqueeze(1)).squeeze(1)
    if min_similarity is not None:
        choice = torch.where(best_sim >= min_similarity, choice, torch.full_like(choice, -1))
    best_sim = torch.where(choice >= 0, best_sim, torch.zeros_like(best_sim))
    return RouteResult(choice, length, best_sim)


def subject_positions(ids: Sequence[int], variants: Sequence[Sequence[int]]) -> list[int]:
    """Positions in ``ids`` of the longest subject variant that occurs there (its last occurrence), as
    :func:`route` finds it in a query; empty when none occurs."""
    best: list[int] = []
    for v in variants:
        n = len(v)
        for i in range(len(ids) - n, -1, -1):
            if n and list(ids[i : i + n]) == list(v):
                if n > len(best):
                    best = list(range(i, i + n))
                break
    return best


def residual(
    x: torch.Tensor,
    entry: torch.Tensor,
    columns: torch.Tensor,
    memory_of: torch.Tensor,
    table_t: torch.Tensor,
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """The side memories' contribution per token: ``M_j[:, c_e] x[c_e]`` for the token's entry ``e`` (its
    memory ``j``, its columns ``c_e``), plus the entry's own output vector ``v_e`` when the memories have
    them, zero for tokens on the main memory.

    Args:
        x: (N, d_in).
        entry: (N,) long, the answering entry of each token (-1: none).
        columns: (E, k) long, each entry's columns.
        memory_of: (E,) long, each entry's memory.
        table_t: (J * d_in, d_out) the memories' task vectors, transposed and stacked (row ``j * d_in + c`` is
            column ``c`` of memory ``j``).
        values: (E, d_out) each entry's output vector (``keyed.values``), or None.

    Returns:
        (N, d_out). One embedding-bag: k x d_out multiply-adds per token, whatever the number of edits, and no
        (N, d_out, k) intermediate.
    """
    d_in = x.shape[1]
    e = entry.clamp(min=0)
    cols = columns[e]  # (N, k)
    idx = memory_of[e].unsqueeze(1) * d_in + cols
    routed = (entry >= 0).to(x.dtype).unsqueeze(1)
    out = F.embedding_bag(idx, table_t.to(x.dtype), per_sample_weights=x.gather(1, cols) * routed, mode="sum")
    if values is not None:
        out = out + values.to(x.dtype)[e] * routed
    return out


__all__ = [
    "RouteResult",
    "SubjectTable",
    "last_positions",
    "ngram_hashes",
    "relation_vectors",
    "residual",
    "route",
    "run_lengths",
    "segment_means",
    "subject_positions",
    "variant_hash",
]
