"""Merging knowledge shards (paper Sec. 2.3.2) with TIES (Yadav et al., NeurIPS 2023).

Every shard is a task vector ``tau_k = W'_k - W`` relative to the main memory. TIES keeps the largest
``density`` fraction of each tau by magnitude (trim), elects a sign per entry from the summed trimmed
vectors (elect), and averages only the entries that agree with the elected sign (disjoint merge).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top-``density`` fraction of entries by magnitude, zero the rest."""
    if density >= 1.0:
        return tau
    k = int(round(tau.numel() * density))
    if k <= 0:
        return torch.zeros_like(tau)
    flat = tau.abs().flatten()
    # kthvalue of the (numel-k+1)-th smallest == k-th largest; ties at the cut are all kept.
    cut = flat.kthvalue(flat.numel() - k + 1).values
    return torch.where(tau.abs() >= cut, tau, torch.zeros_like(tau))


def ties_merge(deltas: Sequence[torch.Tensor], density: float = 0.53, weight: float = 1.0) -> torch.Tensor:
    """Merge task vectors with TIES: trim, elect sign, disjoint mean.

    Args:
        deltas: task vectors of equal shape, each ``side_k - main``.
        density: fraction of entries of each task vector kept by trimming.
        weight: scale of the merged task vector (the reference's ``weights``).

    Returns:
        The merged task vector, same shape and dtype as the inputs.

    Raises:
        ValueError: no deltas, or shapes differ.
    """
    if not deltas:
        raise ValueError("ties_merge needs at least one task vector")
    shape = deltas[0].shape
    if any(d.shape != shape for d in deltas):
        raise ValueError(f"task vectors differ in shape: {[tuple(d.shape) for d in deltas]}")
    trimmed = torch.stack([_trim(d, density) for d in deltas])  # (K, out, in)
    sign = torch.sign(trimmed.sum(dim=0))  # (out, in): elected sign, 0 where the sum cancels
    agree = (torch.sign(trimmed) == sign.unsqueeze(0)) & (trimmed != 0)  # (K, out, in)
    total = (trimmed * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return (weight * total / count).to(deltas[0].dtype)


def linear_merge(deltas: Sequence[torch.Tensor], density: float = 1.0, weight: float = 1.0) -> torch.Tensor:
    """Plain average of task vectors (a baseline for TIES; ``density`` is ignored)."""
    if not deltas:
        raise ValueError("linear_merge needs at least one task vector")
    return weight * torch.stack(list(deltas)).mean(dim=0)


MERGERS: dict[str, Callable[..., torch.Tensor]] = {"ties": ties_merge, "linear": linear_merge}


def get_merger(name: str) -> Callable[..., torch.Tensor]:
    """Look up a merge algorithm by name; the error lists the choices."""
    try:
        return MERGERS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; choose one of {sorted(MERGERS)}") from None
