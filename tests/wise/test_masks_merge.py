import pytest
import torch

from wise.config import WiseConfig
from wise.masks import shard_mask
from wise.memory import Memory, MemoryBank
from wise.merge import get_merger, linear_merge, ties_merge


def test_disjoint_masks_are_orthogonal_and_cover_everything():
    shape = (12, 20)
    masks = [shard_mask(shape, 0.2, "disjoint", seed=3, shard_id=i) for i in range(5)]
    total = torch.stack(masks).sum(0)
    assert torch.equal(total, torch.ones(shape, dtype=total.dtype))  # each entry in exactly one shard
    for m in masks:
        assert abs(m.float().mean().item() - 0.2) < 0.01
    # the sixth shard starts a new cycle with a different permutation
    assert not torch.equal(shard_mask(shape, 0.2, "disjoint", seed=3, shard_id=5), masks[0])


def test_random_masks_ratio_determinism_and_independence():
    a = shard_mask((200, 300), 0.2, "random", seed=1, shard_id=0)
    b = shard_mask((200, 300), 0.2, "random", seed=1, shard_id=0)
    c = shard_mask((200, 300), 0.2, "random", seed=1, shard_id=1)
    assert torch.equal(a, b)
    assert abs(a.float().mean().item() - 0.2) < 0.01
    overlap = (a & c).float().mean().item()
    assert abs(overlap - 0.04) < 0.01  # independent Bernoulli(0.2) masks overlap on ~ratio^2


def test_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown mask kind"):
        shard_mask((2, 2), 0.2, "striped", 0, 0)
    with pytest.raises(ValueError, match="ratio"):
        shard_mask((2, 2), 1.5, "random", 0, 0)


def test_ties_merge_hand_computed():
    t1 = torch.tensor([[3.0, -1.0, 0.5, 2.0]])
    t2 = torch.tensor([[1.0, 2.0, -0.4, -4.0]])
    t3 = torch.tensor([[-2.0, 1.0, 0.3, 1.0]])
    # density 0.5 keeps the 2 largest |.| of each: t1 -> [3,0,0,2], t2 -> [0,2,0,-4], t3 -> [-2,1,0,0]
    # elected signs of the sums [1, 3, 0, -2]: [+, +, 0, -]
    # entry 0: agreeing {3} -> 3; entry 1: {2, 1} -> 1.5; entry 2: nothing -> 0; entry 3: {-4} -> -4
    merged = ties_merge([t1, t2, t3], density=0.5, weight=1.0)
    assert torch.allclose(merged, torch.tensor([[3.0, 1.5, 0.0, -4.0]]))
    assert torch.allclose(ties_merge([t1, t2, t3], density=0.5, weight=2.0), 2 * merged)


def test_ties_full_density_disjoint_supports_is_sum():
    # shards written through disjoint masks merge without interference: TIES returns their sum
    a = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    b = torch.tensor([[0.0, 3.0], [-1.0, 0.0]])
    assert torch.equal(ties_merge([a, b], density=1.0), a + b)


def test_merge_registry_and_errors():
    assert get_merger("ties") is ties_merge
    assert torch.equal(linear_merge([torch.ones(2), 3 * torch.ones(2)]), 2 * torch.ones(2))
    with pytest.raises(ValueError, match=r"choose one of \['linear', 'ties'\]"):
        get_merger("dare")
    with pytest.raises(ValueError, match="differ in shape"):
        ties_merge([torch.zeros(2, 2), torch.zeros(3)])
    with pytest.raises(ValueError, match="at least one"):
        ties_merge([])


def _shard(i: int, delta: torch.Tensor) -> Memory:
    key = torch.ones((2, delta.shape[1]), dtype=torch.float16)
    return Memory(delta, [f"e{i}"], [f"p{i}"], [f"t{i}"], [i], keys=[key])


def test_wise_merge_adds_the_merge_of_later_shards_to_the_merged_memory_and_retrieve_keeps_groups_apart():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(4, 6, generator=g) * shard_mask((4, 6), 0.5, "random", 0, i) for i in range(4)]
    cfg = WiseConfig(
        layout="shards", save_freq=1, merge_freq=2, retrieve=False, merge={"method": "ties", "density": 0.53}
    )
    bank = MemoryBank(cfg)
    assert bank.base() is None  # the first group starts from the main memory
    assert [bank.first_of_group(i) for i in range(5)] == [0, 0, 2, 2, 4]
    for i in range(2):
        bank.store(_shard(i, deltas[i].clone()))
    first = ties_merge(deltas[:2], density=0.53)
    assert torch.equal(bank.merged[0].delta, first) and not bank.pending
    assert bank.base() is bank.merged[0].delta
    # the next group's shards start from the merged memory, each writes its own subspace on top of it
    for i in range(2, 4):
        bank.store(_shard(i, first + deltas[i]))
    # WISE-Merge (paper Sec. 2.3.2): merged + TIES of the new shards' task vectors relative to it; the earlier
    # merge is not trimmed again
    expected = first + ties_merge([(first + d) - first for d in deltas[2:]], density=0.53)
    assert torch.allclose(bank.merged[0].delta, expected, atol=1e-6)
    assert not torch.allclose(bank.merged[0].delta, ties_merge([first, *deltas[2:]], density=0.53))
    assert bank.merged[0].edit_ids == ["e0", "e1", "e2", "e3"] and bank.merged[0].shard_ids == [0, 1, 2, 3]
    assert len(bank.merged[0].keys) == 4 and bank.merged[0].threshold < float("inf")
    # a group of one shard trained on the merged memory is that shard
    one = MemoryBank(cfg.model_copy(update={"merge_freq": 1}))
    one.store(_shard(0, deltas[0].clone()))
    one.store(_shard(1, deltas[0] + deltas[1]))
    assert torch.equal(one.merged[0].delta, deltas[0] + deltas[1]) and one.merged[0].edit_ids == ["e0", "e1"]

    # WISE-Retrieve: every group becomes its own memory
    rbank = MemoryBank(cfg.model_copy(update={"retrieve": True}))
    for i in range(4):
        rbank.store(_shard(i, deltas[i].clone()))
    assert len(rbank.merged) == 2 and all(
        torch.equal(m.delta, ties_merge(deltas[2 * j : 2 * j + 2], density=0.53))
        for j, m in enumerate(rbank.merged)
    )
    assert rbank.base() is None  # WISE-Retrieve shards always start from the main memory


def test_on_merge_sees_each_group_its_base_and_the_merged_memory():
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(4, 6, generator=g) * shard_mask((4, 6), 0.5, "random", 0, i) for i in range(4)]
    bank = MemoryBank(WiseConfig(layout="shards", save_freq=1, merge_freq=2, retrieve=False))
    seen = []
    bank.on_merge = lambda group, base, merged: seen.append(
        ([m.shard_ids[0] for m in group], None if base is None else base.clone(), merged)
    )
    bank.store(_shard(0, deltas[0].clone()))
    assert not seen  # no merge before the cadence
    bank.store(_shard(1, deltas[1].clone()))
    first = bank.merged[0]
    bank.store(_shard(2, first.delta + deltas[2]))
    bank.store(_shard(3, first.delta + deltas[3]))
    assert [s[0] for s in seen] == [[0, 1], [2, 3]]
    assert seen[0][1] is None and torch.equal(
        seen[1][1], first.delta
    )  # the second group started from the first
    assert seen[0][2] is first and seen[1][2] is bank.merged[0]
