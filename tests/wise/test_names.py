"""Whole names (``wise.keyed.whole_names``): a subject found inside a longer name does not route."""

from __future__ import annotations

import torch

from wise.keyed.names import (
    ALNUM,
    END_ALNUM,
    NAME,
    SPACED,
    decode_flags,
    encode_flags,
    name_flags,
    name_span,
    token_flags,
)
from wise.keyed.table import SubjectTable, route


def test_token_flags_tell_words_names_and_function_words():
    assert token_flags(" Tammet") == SPACED | ALNUM | NAME | END_ALNUM
    assert token_flags("Jill") == ALNUM | NAME | END_ALNUM  # a prompt's first word
    assert token_flags("s") == ALNUM | END_ALNUM
    assert token_flags(" In") == SPACED | ALNUM | END_ALNUM and token_flags("The") == ALNUM | END_ALNUM
    assert token_flags(",") == 0 and token_flags(" ") == SPACED and token_flags("'s") == END_ALNUM
    assert (
        token_flags("Paris", spaced=True) == SPACED | ALNUM | NAME | END_ALNUM
    )  # SentencePiece's "\u2581Paris"


def _route(seqs, subjects, flags):
    t = len(seqs[0])
    ids = torch.tensor(seqs).flatten()
    return route(
        ids,
        torch.randn(ids.numel(), 6),
        torch.arange(len(seqs)).repeat_interleave(t),
        torch.ones(ids.numel(), dtype=torch.bool),
        len(seqs),
        SubjectTable.build(subjects),
        torch.nn.functional.normalize(torch.randn(len(subjects), 4), dim=-1),
        torch.randn(6, 4),
        None,
        name_flags=flags,
    ).choice.tolist()


def test_route_refuses_subjects_inside_longer_names():
    word, name = SPACED | ALNUM | END_ALNUM, SPACED | ALNUM | NAME | END_ALNUM
    # vocabulary: 0 "," / 1 " speaks" / 2 " Jill" / 3 " In" / 4 "s" / 5 " Ireland" / 6 " Kim" / 7 " Paris" /
    # 8 "berley" / 9 "Ireland" (a prompt's first word)
    flags = torch.tensor(
        [
            0,
            word,
            name,
            word,
            ALNUM | END_ALNUM,
            name,
            name,
            name,
            ALNUM | END_ALNUM,
            ALNUM | NAME | END_ALNUM,
        ]
    )
    subjects = [[[5], [9]], [[7]], [[2, 5]]]
    seqs = [
        [3, 5, 0, 1],  # " In Ireland , speaks": a function word before: routes
        [2, 5, 1, 1],  # " Jill Ireland speaks": the longer name is an edit of its own: routes to it
        [6, 8, 5, 1],  # " Kimberley Ireland speaks": a name word (two tokens) before: refused
        [1, 5, 4, 1],  # " speaks Irelands": a glued piece after: refused
        [1, 5, 6, 1],  # " speaks Ireland Kim": a name word after: refused
        [6, 5, 7, 1],  # " Kim Ireland Paris": Ireland follows a name word, Paris too: refused
        [1, 7, 0, 5],  # both stand alone: the last of equal length wins
        [9, 1, 1, 1],  # "Ireland speaks": a prompt's first word routes
        [1, 8, 9, 1],  # " speaksberleyIreland": glued to the word before: refused
    ]
    assert _route(seqs, subjects, flags) == [0, 2, -1, -1, -1, -1, 0, 0, -1]
    # the rule off: every contiguous match counts
    assert _route(seqs, subjects, None) == [0, 2, 0, 0, 0, 1, 0, 0, 0]


def test_flags_of_a_tokenizer_round_trip_through_their_encoding(tiny_tokenizer):
    flags = name_flags(tiny_tokenizer)
    assert flags.shape == (len(tiny_tokenizer),) and flags.dtype == torch.uint8
    assert torch.equal(decode_flags(encode_flags(flags)), flags)
    ids = tiny_tokenizer("Jill", add_special_tokens=False)["input_ids"]
    assert int(flags[ids[0]]) & NAME


def test_a_derived_subject_span_grows_to_whole_words_and_the_name_around_them():
    word, name, piece = SPACED | ALNUM | END_ALNUM, SPACED | ALNUM | NAME | END_ALNUM, ALNUM | END_ALNUM
    # "The capital of| Pa|ris| Nord| is": rare tokens found: "ris" (2) only
    flags = [ALNUM | END_ALNUM, word, word, name, piece, name, word]
    assert name_span(flags, 4, 5) == (3, 6)  # " Paris Nord"
    assert name_span(flags, 1, 2) == (1, 2)  # a lower-case word stays itself
    assert name_span(flags, 3, 3) == (3, 3)  # empty
