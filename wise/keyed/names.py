"""Whole names: a subject found inside a longer name does not route (``wise.keyed.whole_names``).

Subject matching is on tokens, so an edited ``"Ireland"`` is found in ``"Jill Ireland is originally from"``
and an edited ``"Daniel"`` in ``"Daniel Tammet speaks"``: questions about other entities that the edit must
not answer. A match is refused when the token after it continues the name (opens a capitalised word, or glues
to the match's last word: ``" Tammet"``, ``"s"``), or the word before it (read back to its first token) is a
capitalised word other than a function word that opens a sentence (``"Jill"``, but not ``"In"`` in ``"In
Romania, ..."`` or ``"The"``), or the match's first token glues to the word before it.

The rule reads one flag byte per vocabulary token (:func:`name_flags`, from the tokenizer). It only refuses
matches; a refused one leaves the query to a shorter subject elsewhere in it, or to the main memory. Limits:
lower-case name parts (``"de"`` in ``"Orchestre National de Lyon"``) are not name parts to it, and a
tokenizer that makes a space a token of its own hides the word after the match from it (byte-level BPE and
SentencePiece attach spaces to words). A subject derived from a record without one is widened to whole words
and the name around them (:func:`name_span`), so an edit's own prompt still routes.
"""

from __future__ import annotations

import base64
import zlib

import torch

ALNUM = 1  # starts with a letter or digit
SPACED = 2  # starts with a space (a word boundary before it)
NAME = 4  # starts with a capital letter and is not a function word: a word of a name when it opens one
END_ALNUM = 8  # ends with a letter or digit (a glued token after it continues its word)

FUNCTION_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "in",
        "on",
        "at",
        "of",
        "for",
        "from",
        "to",
        "by",
        "with",
        "and",
        "or",
        "but",
        "as",
        "if",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "his",
        "her",
        "their",
        "my",
        "our",
        "your",
        "what",
        "where",
        "which",
        "who",
        "whom",
        "whose",
        "when",
        "why",
        "how",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "do",
        "does",
        "did",
        "can",
        "could",
        "will",
        "would",
        "shall",
        "should",
        "may",
        "might",
        "must",
        "has",
        "have",
        "had",
        "not",
        "no",
        "yes",
        "there",
        "here",
        "q",
    ]
)


def token_flags(text: str, spaced: bool | None = None) -> int:
    """The flags of one token's text (as the tokenizer decodes it); ``spaced`` overrides the leading-space test
    (a SentencePiece piece ``"\u2581X"`` decodes without its space)."""
    word = text.strip()
    flags = SPACED if (text[:1].isspace() if spaced is None else spaced) else 0
    if not word:
        return flags
    if word[0].isalnum():
        flags |= ALNUM
        if word[0].isupper() and word.lower() not in FUNCTION_WORDS:
            flags |= NAME
    if text[-1:].isalnum():
        flags |= END_ALNUM
    return flags


def flags_of(tokenizer, ids) -> list[int]:
    """The flags of the tokens ``ids`` of ``tokenizer``."""
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    return [
        0
        if p is None
        else token_flags(tokenizer.convert_tokens_to_string([p]), p[:1] in ("\u0120", "\u2581") or None)
        for p in pieces
    ]


def name_flags(tokenizer) -> torch.Tensor:
    """(V,) uint8 flags of every token of ``tokenizer``'s vocabulary."""
    return torch.tensor(flags_of(tokenizer, range(len(tokenizer))), dtype=torch.uint8)


def name_span(flags: list[int], start: int, end: int) -> tuple[int, int]:
    """Tokens ``[start, end)`` widened to whole words, then to the name words next to them: the span the
    whole-name rule accepts as a subject (a subject derived from a few rare tokens of a prompt)."""

    def glued(i: int) -> bool:
        return (
            0 < i < len(flags)
            and bool(flags[i] & ALNUM)
            and not flags[i] & SPACED
            and bool(flags[i - 1] & END_ALNUM)
        )

    def word_start(i: int) -> int:
        while glued(i):
            i -= 1
        return i

    def word_end(i: int) -> int:  # i: a word's first token; returns one past its last
        i += 1
        while glued(i):
            i += 1
        return i

    if end <= start:
        return start, end
    start, end = word_start(start), word_end(end - 1)
    while start > 0 and flags[word_start(start - 1)] & NAME:
        start = word_start(start - 1)
    while end < len(flags) and flags[end] & NAME:
        end = word_end(end)
    return start, end


def encode_flags(flags: torch.Tensor) -> str:
    """Flags as a compact JSON-able string (they travel in a state's setup and to the serving replicas)."""
    return base64.b64encode(zlib.compress(flags.to(torch.uint8).cpu().numpy().tobytes(), 9)).decode()


def decode_flags(text: str) -> torch.Tensor:
    """The inverse of :func:`encode_flags`."""
    raw = zlib.decompress(base64.b64decode(text))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def inside_name(
    ids: torch.Tensor,
    seg: torch.Tensor,
    span: torch.Tensor,
    runs: torch.Tensor,
    max_len: int,
    flags: torch.Tensor,
) -> torch.Tensor:
    """(N, L) bool: the n-gram of length n ending at position i (column n - 1) lies inside a longer name.

    Words are read off the tokens: a token glues to the one before it (continues its word) when it starts with a
    letter or digit, has no space before it, and the token before it ends with one. The token after the n-gram
    must not glue to it nor open a name word; the word before it must not be a name word, and the n-gram's
    first token must not glue to it.

    Args:
        ids: (N,) token ids; seg: (N,) segments; span: (N,) the query tokens.
        runs: (N,) :func:`wise.keyed.table.run_lengths` of ``span`` and ``seg``.
        max_len: L.
        flags: (V,) uint8 :func:`name_flags`.
    """
    n = ids.shape[0]
    dev = ids.device
    f = flags.to(dev)
    v = f.numel()
    tf = torch.where(ids < v, f[ids.clamp(min=0, max=v - 1)], torch.zeros_like(f[:1])).to(torch.int64)
    pos = torch.arange(n, device=dev)
    has_before = runs > 1  # the token before is a query token of the same segment
    prev_tf = torch.cat([tf.new_zeros(1), tf[:-1]])
    glued = has_before & ((tf & ALNUM) != 0) & ((tf & SPACED) == 0) & ((prev_tf & END_ALNUM) != 0)  # (N,)
    # the first token of each position's word, and whether that word is a name word
    head = torch.cummax(torch.where(glued, torch.zeros_like(pos), pos), dim=0).values
    name_word = (tf[head] & NAME) != 0  # (N,)
    nxt_ok = torch.cat([has_before[1:], has_before.new_zeros(1)])  # position i + 1 continues i's run
    nxt_glued = torch.cat([glued[1:], glued.new_zeros(1)])
    nxt_name = torch.cat([((tf & NAME) != 0)[1:], glued.new_zeros(1)])
    after = nxt_ok & (nxt_glued | nxt_name)  # (N,)
    lengths = torch.arange(1, max_len + 1, device=dev)
    first = (pos.unsqueeze(1) - lengths.unsqueeze(0) + 1).clamp(min=0)  # (N, L) the n-gram's first token
    has_prev = lengths.unsqueeze(0) < runs.unsqueeze(1)
    before = has_prev & (name_word[(first - 1).clamp(min=0)] | glued[first])
    return after.unsqueeze(1) | before


__all__ = [
    "ALNUM",
    "flags_of",
    "name_span",
    "END_ALNUM",
    "FUNCTION_WORDS",
    "NAME",
    "SPACED",
    "decode_flags",
    "encode_flags",
    "inside_name",
    "name_flags",
    "token_flags",
]
