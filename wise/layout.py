"""Where the pieces WISE needs live inside a Hugging Face causal LM, by architecture.

Modules are found by name (``model.get_submodule``), never by hard-coded attribute chains in the algorithm.
Adding an architecture is one registry entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class LayoutError(ValueError):
    """The model does not have the structure WISE needs, or the architecture is unknown."""


@dataclass(frozen=True)
class Layout:
    """Module paths for one architecture family.

    Attributes:
        blocks: path of the ``ModuleList`` of decoder blocks.
        mlp_out: path of the MLP output projection inside a block (the main memory).
        final_norm: path of the norm applied before the LM head.
        transposed: True when the projection stores its weight as (in, out) (GPT-2's ``Conv1D``).
    """

    blocks: str
    mlp_out: str
    final_norm: str
    transposed: bool = False


LAYOUTS: dict[str, Layout] = {
    "llama": Layout("model.layers", "mlp.down_proj", "model.norm"),
    "mistral": Layout("model.layers", "mlp.down_proj", "model.norm"),
    "qwen2": Layout("model.layers", "mlp.down_proj", "model.norm"),
    "qwen3": Layout("model.layers", "mlp.down_proj", "model.norm"),
    "gemma": Layout("model.layers", "mlp.down_proj", "model.norm"),
    "gpt2": Layout("transformer.h", "mlp.c_proj", "transformer.ln_f", transposed=True),
}


@dataclass(frozen=True)
class ResolvedLayout:
    """The concrete modules of one model for one edited layer."""

    layout: Layout
    layer: int
    module_path: str
    blocks: nn.ModuleList
    block: nn.Module
    module: nn.Module
    final_norm: nn.Module
    lm_head: nn.Module


def resolve_layout(model: nn.Module, layer: int, module: str | None = None) -> ResolvedLayout:
    """Locate the edited projection, its block, the blocks above it, the final norm and the LM head.

    Args:
        model: a Hugging Face causal LM.
        layer: index of the edited block.
        module: optional explicit path template of the edited module containing ``{layer}``.

    Returns:
        The resolved modules.

    Raises:
        LayoutError: unknown architecture, bad layer index, or a path that does not exist.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise LayoutError(
            f"architecture {model_type!r} is not in the layout registry; known: {sorted(LAYOUTS)} "
            "(add an entry to wise.layout.LAYOUTS)"
        )
    layout = LAYOUTS[model_type]
    try:
        blocks = model.get_submodule(layout.blocks)
    except AttributeError as exc:
        raise LayoutError(f"{model_type}: no block list at {layout.blocks!r}") from exc
    if not 0 <= layer < len(blocks):
        raise LayoutError(f"wise.layer ({layer}) is out of range: the model has {len(blocks)} blocks")
    path = module.format(layer=layer) if module else f"{layout.blocks}.{layer}.{layout.mlp_out}"
    block_prefix = f"{layout.blocks}.{layer}."
    if not path.startswith(block_prefix):
        raise LayoutError(f"wise.module {path!r} must lie inside block {block_prefix!r}")
    try:
        target = model.get_submodule(path)
        final_norm = model.get_submodule(layout.final_norm)
    except AttributeError as exc:
        raise LayoutError(f"{model_type}: {exc}") from exc
    if not hasattr(target, "weight") or target.weight.dim() != 2:
        raise LayoutError(f"{path} has no 2-D weight; WISE edits a linear projection")
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise LayoutError(f"{model_type}: the model has no output embeddings (LM head)")
    return ResolvedLayout(layout, layer, path, blocks, blocks[layer], target, final_norm, lm_head)
