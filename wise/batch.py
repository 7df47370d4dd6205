"""Tokenised batches for editing and evaluation.

Every row is ``prefix + prompt + target`` (right-padded). Alongside the ids we keep, per row, the *query span*
(the prompt's tokens: what the router sees when the same question is asked at serving time) and the labels
(the target's tokens at the positions that predict them). Training-time and query-time routing statistics are
taken over the same span; measuring them over different tokens is what made the reference's thresholds miss on
small models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE = -100


class PromptTooLongError(ValueError):
    """An edit prompt (plus target) exceeds ``wise.max_prompt_tokens``."""


@dataclass(frozen=True)
class Row:
    """One sequence: ``prefix`` tokens (not routed on), ``query`` tokens (routed on), ``answer`` tokens."""

    prefix: tuple[int, ...]
    query: tuple[int, ...]
    answer: tuple[int, ...]


@dataclass
class Batch:
    """Padded tensors for a list of rows.

    Attributes:
        input_ids: (B, T) token ids, right-padded.
        attention_mask: (B, T) 1 on real tokens.
        span: (B, T) bool, True on each row's query tokens.
        labels: (B, T) the next token to predict at answer-predicting positions, IGNORE elsewhere.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    span: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.span, self.labels)))


class Tokens:
    """Tokenisation conventions shared by editing and evaluation."""

    def __init__(self, tokenizer, max_tokens: int = 256) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def prompt(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=True).input_ids)

    def plain(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False).input_ids)

    def answer(self, text: str) -> tuple[int, ...]:
        """Answer tokens as they follow a prompt: with a leading space, as in ``"prompt answer"``."""
        ids = self.plain(" " + text.strip())
        if not ids:
            raise PromptTooLongError(f"answer {text!r} tokenises to nothing")
        return ids

    def row(self, prompt: str, answer: str, template: str = "{}") -> Row:
        """Tokenise ``template.format(prompt)`` followed by the answer; the query span is the prompt only."""
        prefix_text = template.split("{}")[0]
        prefix = self.prompt(prefix_text.rstrip()) if prefix_text.strip() else ()
        query = self.plain(" " + prompt) if prefix else self.prompt(prompt)
        row = Row(prefix, query, self.answer(answer))
        n = len(row.prefix) + len(row.query) + len(row.answer)
        if n > self.max_tokens:
            raise PromptTooLongError(
                f"prompt + answer is {n} tokens, over max_prompt_tokens={self.max_tokens}"
            )
        return row

    def collate(self, rows: Sequence[Row]) -> Batch:
        """Right-pad rows into a :class:`Batch`."""
        width = max(len(r.prefix) + len(r.query) + len(r.answer) for r in rows)
        b = len(rows)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        span = torch.zeros((b, width), dtype=torch.bool)
        labels = torch.full((b, width), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            seq = r.prefix + r.query + r.answer
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            q0 = len(r.prefix)
            span[i, q0 : q0 + len(r.query)] = True
            a0 = q0 + len(r.query)
            # position t predicts token t+1
            labels[i, a0 - 1 : a0 - 1 + len(r.answer)] = torch.tensor(r.answer)
        return Batch(ids, mask, span, labels)
