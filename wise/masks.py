"""Per-shard gradient masks (paper Sec. 2.3.2, knowledge sharding).

Each shard writes only into the entries of the side memory that its mask selects. ``random`` draws a
Bernoulli(mask_ratio) mask per shard, as the paper does (two shards overlap on about ratio^2 of the entries);
``disjoint`` cuts one random permutation of all entries into 1/ratio blocks, so that consecutive shards are
strictly orthogonal (their supports never intersect) for the first 1/ratio shards, then the cycle repeats.
Masks are a pure function of ``(seed, shard_id)``, so they need not be stored in checkpoints.
"""

from __future__ import annotations

import torch

_MASK_STREAM = 0x5EED_0001  # keeps mask RNG streams apart from other seeded streams


def _generator(seed: int, salt: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed((seed * 1_000_003 + salt * 7919 + _MASK_STREAM) % (2**63 - 1))
    return gen


def shard_mask(shape: tuple[int, ...], ratio: float, kind: str, seed: int, shard_id: int) -> torch.Tensor:
    """Return the boolean gradient mask of one shard.

    Args:
        shape: shape of the edited weight.
        ratio: fraction of entries each shard may change (paper: 0.2).
        kind: ``random`` or ``disjoint``.
        seed: the job's seed.
        shard_id: 0-based index of the shard in the stream.

    Returns:
        A bool tensor of ``shape`` on the CPU.

    Raises:
        ValueError: unknown kind or ratio outside (0, 1].
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"mask ratio must lie in (0, 1], got {ratio}")
    numel = 1
    for dim in shape:
        numel *= dim
    if kind == "random":
        gen = _generator(seed, shard_id)
        return (torch.rand(numel, generator=gen) < ratio).reshape(shape)
    if kind == "disjoint":
        n_blocks = max(1, int(round(1 / ratio)))
        cycle, block = divmod(shard_id, n_blocks)
        perm = torch.randperm(numel, generator=_generator(seed, -1 - cycle))
        bounds = torch.linspace(0, numel, n_blocks + 1).round().long()
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[perm[bounds[block] : bounds[block + 1]]] = True
        return flat.reshape(shape)
    raise ValueError(f"unknown mask kind {kind!r}; choose one of ['disjoint', 'random']")
