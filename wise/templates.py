"""Context templates (paper App. B.6): the edit is also trained behind short random prefixes that the model
itself generates, so that the side memory fires on the edit's content in different contexts.

Sampling uses a seeded ``torch.Generator``; the resulting strings are part of the editor state, so a reloaded
editor trains with the same templates.
"""

from __future__ import annotations

import torch
from torch import nn

from wise.config import TemplateConfig


@torch.no_grad()
def generate_templates(model: nn.Module, tokenizer, cfg: TemplateConfig, seed: int) -> list[str]:
    """Return ``["{}"]`` followed by ``cfg.count`` model-generated prefixes of the form ``"<prefix>. {}"``.

    Args:
        model: the causal LM (unedited).
        tokenizer: its tokenizer.
        cfg: how many prefixes, how long, and which seed words start them.
        seed: job seed; the templates are a pure function of (model, seed, cfg).

    Returns:
        Format strings with one ``{}`` slot for the edit prompt.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed * 7_919 + 17)
    device = next(model.parameters()).device
    templates = ["{}"]
    for i in range(cfg.count):
        start = cfg.seeds[i % len(cfg.seeds)]
        ids = tokenizer(start, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        for _ in range(cfg.length):
            logits = model(input_ids=ids, use_cache=False).logits[0, -1].float().cpu()
            # top-k sampling keeps prefixes fluent while the generator keeps them reproducible
            top = torch.topk(logits, 20)
            probs = torch.softmax(top.values, dim=-1)
            nxt = top.indices[torch.multinomial(probs, 1, generator=gen)]
            ids = torch.cat([ids, nxt.view(1, 1).to(device)], dim=1)
        text = tokenizer.decode(ids[0], skip_special_tokens=True)
        text = " ".join(text.replace("{", "(").replace("}", ")").split())
        templates.append(text.rstrip(".") + ". {}")
    return templates
