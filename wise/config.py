"""Typed, frozen WISE hyper-parameters.

Defaults follow the WISE paper (Wang et al., NeurIPS 2024, App. B) and its LLaMA-2-7B settings, except where
the embedded model needs otherwise; those places say why. Unknown keys and bad values fail at construction with
the key path in the message (pydantic), so a typo in a YAML file never silently falls back to a default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class FrozenConfig(BaseModel):
    """Base of every config model: immutable, and an unknown key is an error rather than silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MarginConfig(FrozenConfig):
    """Activation-margin loss (paper Eq. 5): irrelevant inputs below ``alpha``, edit inputs above ``beta``,
    and a gap of at least ``gamma`` between them.

    ``scale: absolute`` uses the numbers as they are (the paper's (5, 20, 10) were tuned on 4096-wide models).
    ``scale: auto`` reads them as multiples of the edited layer's own activation scale, measured once on the
    irrelevant pool (the median per-token norm of the main memory's output), so the same numbers fit any width.
    """

    alpha: float = Field(5.0, gt=0)
    beta: float = Field(20.0, gt=0)
    gamma: float = Field(10.0, gt=0)
    scale: Literal["absolute", "auto"] = "absolute"

    @model_validator(mode="after")
    def _order(self) -> MarginConfig:
        if self.beta <= self.alpha:
            raise ValueError(f"margins.beta ({self.beta}) must exceed margins.alpha ({self.alpha})")
        return self


class TemplateConfig(FrozenConfig):
    """Context templates (paper App. B.6): the empty template plus prefixes sampled from the model."""

    count: int = Field(5, ge=0, le=64, description="random prefixes besides the empty template")
    length: int = Field(8, ge=1, le=64, description="tokens generated per prefix")
    seeds: tuple[str, ...] = ("The", "I", "Because", "You", "Yes", "Therefore", "It", "In")


class MergeConfig(FrozenConfig):
    """Shard merging (paper Sec. 2.3.2, TIES: Yadav et al. 2023)."""

    method: str = "ties"

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        from wise.merge import MERGERS

        if v not in MERGERS:
            raise ValueError(f"unknown merge method {v!r}; choose one of {sorted(MERGERS)}")
        return v

    density: float = Field(0.53, gt=0, le=1, description="fraction of each task vector kept by TIES trimming")
    weights: float = Field(1.0, gt=0, description="scale applied to the merged task vector")


class KeyedConfig(FrozenConfig):
    """The keyed layout (``wise.layout: keyed``, the default): every edit writes ``columns`` columns of one
    residual memory block (chosen at random per edit), and a query reaches them only through its subject (see
    :mod:`wise.keyed.table`). Memory and serving cost stay bounded: one dense block per ``block_edits`` edits plus
    a few hundred bytes per edit. Settings chosen on the development split: ``docs/design.md``."""

    columns: int = Field(64, ge=1, le=65536, description="memory columns each edit writes and reads")
    block_edits: int = Field(
        2000, ge=1, description="edits per residual memory block (a multiple of merge_freq)"
    )
    lr: float = Field(0.05, gt=0, description="Adam learning rate of an edit's columns")
    n_iter: int = Field(30, ge=1, description="optimisation steps per edit at most")
    early_stop_loss: float = Field(0.02, ge=0, description="stop an edit once its target loss is below this")
    relation_dim: int = Field(256, ge=8, le=4096, description="size of the relation keys")
    relation_key: Literal["mean", "residual"] = Field(
        "mean",
        description="what a relation key reads: the mean input of the edited projection over the prompt's "
        "tokens besides the subject (mean), or the residual stream entering the edited block at the prompt's "
        "last token (residual; kept whole when relation_dim is the model's width)",
    )
    min_similarity: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="an edit whose subject matches answers only if its relation key's cosine similarity to "
        "the query reaches this (None: the subject alone decides)",
    )
    whole_names: bool = Field(
        True,
        description="a subject found inside a longer name ('Ireland' in 'Jill Ireland') does not route",
    )
    values: bool = Field(
        False,
        description="each edit also learns one output vector of its own, added at every token of a query "
        "routed to it (d_out half-precision numbers per edit)",
    )
    value_lr: float = Field(5.0, gt=0, description="Adam learning rate of an edit's output vector")


# keyed settings read only when a query is routed: a state does not depend on them (benchmarks resume a run's
# state when only these differ)
KEYED_ROUTING_ONLY = ("min_similarity", "whole_names")
# keyed settings that decide only the relation keys an edit stores, which can be computed again from its stored
# prompt and subject (wise.keyed.editor.KeyedEditor.load_rekeyed)
KEYED_KEY_ONLY = ("relation_key", "relation_dim")
# keyed settings added after states were written, with the value such a state was made with (a benchmark's
# recorded settings that lack one of these keys mean that value)
KEYED_ADDED = {"values": False, "value_lr": 5.0, "relation_key": "mean"}

# keys that only the shards layout (WISE's own: dense shards, margins, activation router) reads
SHARD_ONLY = (
    "lr",
    "n_iter",
    "early_stop_loss",
    "norm_constraint",
    "mask_ratio",
    "mask_kind",
    "margins",
    "act_ratio",
    "router_reduce",
    "n_irrelevant",
    "hard_negatives",
    "merge",
    "retrieve",
    "anchor_previous",
    "replay",
    "replay_size",
    "batch_size",
)


class WiseConfig(FrozenConfig):
    """All editing hyper-parameters. ``docs/configuration.md`` says what each does.

    ``layout`` picks the memory layout: ``keyed`` (default; bounded cost, subject routing, ``keyed.*``) or
    ``shards`` (WISE as in the paper: a dense side memory per shard, margins, activation routing; the keys
    listed in :data:`SHARD_ONLY`). A key of the other layout is an error, not silently ignored.
    """

    layout: Literal["keyed", "shards"] = "keyed"
    keyed: KeyedConfig = KeyedConfig()
    layer: int = Field(23, ge=0, description="index of the edited decoder block")
    module: str | None = Field(
        None,
        description="edited module path with '{layer}', e.g. 'model.layers.{layer}.mlp.down_proj'; "
        "None picks it from the architecture registry",
    )
    lr: float = Field(1.0, gt=0)
    n_iter: int = Field(70, ge=1)
    early_stop_loss: float = Field(
        0.01, ge=0, description="stop an edit once the total loss falls below this"
    )
    norm_constraint: float = Field(1.0, gt=0, description="element-wise bound on |side - main|")
    mask_ratio: float = Field(0.2, gt=0, le=1)
    mask_kind: Literal["random", "disjoint"] = "random"
    margins: MarginConfig = MarginConfig()
    act_ratio: float = Field(
        0.88, gt=0, le=1, description="router threshold = act_ratio x min in-scope activation"
    )
    router_reduce: Literal["mean", "max", "last"] = Field(
        "mean", description="how per-token activations of the query span become one routing score"
    )
    n_irrelevant: int = Field(1, ge=0, le=256, description="irrelevant inputs per edit in the margin loss")
    hard_negatives: float = Field(
        0.0,
        ge=0,
        le=1,
        description="fraction of the irrelevant inputs chosen as the pool prompts whose activations lie nearest "
        "to the edit's (the rest are drawn at random)",
    )
    save_freq: int = Field(500, ge=1, description="edits per knowledge shard")
    merge_freq: int = Field(1000, ge=1, description="edits between merges of the stored shards")
    merge: MergeConfig = MergeConfig()
    retrieve: bool = Field(
        False, description="WISE-Retrieve: keep merged memories apart and pick one per query"
    )
    anchor_previous: bool = Field(
        True,
        description="keep the shard's earlier edits in the margin loss (their cached prompt activations)",
    )
    replay: bool = Field(False, description="replay the shard's earlier edits in each edit's batch")
    replay_size: int = Field(4, ge=1, description="earlier edits of the shard replayed per optimisation")
    batch_size: int = Field(1, ge=1, description="edits optimised together in one optimisation")
    templates: TemplateConfig = TemplateConfig()
    max_prompt_tokens: int = Field(256, ge=8, description="longer edit prompts are rejected")
    seed: int = 0

    @model_validator(mode="after")
    def _cadence(self) -> WiseConfig:
        if self.merge_freq % self.save_freq:
            raise ValueError(
                f"merge_freq ({self.merge_freq}) must be a multiple of save_freq ({self.save_freq})"
            )
        if self.save_freq % self.batch_size:
            raise ValueError(
                f"save_freq ({self.save_freq}) must be a multiple of batch_size ({self.batch_size})"
            )
        if self.layout == "keyed":
            # a value other than the default (a dumped config, which lists every key, still loads)
            wrong = [k for k in SHARD_ONLY if getattr(self, k) != type(self).model_fields[k].default]
            if wrong:
                raise ValueError(f"{', '.join(wrong)}: only for layout 'shards' (this is layout 'keyed')")
            if self.keyed.block_edits % self.merge_freq:
                raise ValueError(
                    f"keyed.block_edits ({self.keyed.block_edits}) must be a multiple of merge_freq "
                    f"({self.merge_freq})"
                )
        elif self.keyed != KeyedConfig():
            raise ValueError("keyed: only for layout 'keyed' (this is layout 'shards')")
        return self
