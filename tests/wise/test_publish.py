"""The serving-side routing rule and the publish wire format, without vLLM.

route_flat (vLLM's flattened layout, segments from query_start_loc) must give exactly what RoutedLinear gives on
the same sequences batched the HF way, for prefill segments and for one-token decode segments.
"""

import dataclasses

import pytest
import torch
from torch import nn

from wise.memory import Memory
from wise.publish import (
    PublishError,
    ServingSnapshot,
    decode_package,
    encode_package,
    memory_id,
    route_flat,
    snapshot_of,
)
from wise.router import RoutedLinear

D_IN, D_OUT, K = 12, 7, 3


def _routed(deltas, thresholds, reduce):
    base = nn.Linear(D_IN, D_OUT, bias=False)
    routed = RoutedLinear(base, reduce=reduce)
    routed.set_memories(deltas, thresholds)
    return routed


@pytest.mark.parametrize("reduce", ["mean", "max", "last"])
def test_route_flat_matches_routed_linear_per_sequence(reduce):
    deltas = torch.randn(K, D_OUT, D_IN)
    lengths = [5, 1, 3, 1, 4]
    seqs = [torch.randn(n, D_IN) for n in lengths]
    # thresholds between the scores so that some sequences route and some do not
    probe = _routed(deltas, torch.ones(K), reduce)
    scores = torch.stack([probe.scores(s.unsqueeze(0))[:, 0] for s in seqs], 1)  # (K, R)
    thresholds = scores.max(dim=1).values * 0.95  # each memory claims only its best sequence
    routed = _routed(deltas, thresholds, reduce)
    expected = [routed(s.unsqueeze(0))[0] - s @ routed.weight.T for s in seqs]
    choices = [int(routed.route(s.unsqueeze(0))[0]) for s in seqs]
    assert -1 in choices and any(c >= 0 for c in choices), choices  # both outcomes exercised

    x = torch.cat(seqs)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    padded = torch.cat([x, torch.randn(2, D_IN)])  # two padding rows past starts[-1]
    got = route_flat(padded, deltas, thresholds, starts, reduce)
    assert got.shape == (x.shape[0] + 2, D_OUT)
    torch.testing.assert_close(got[: x.shape[0]], torch.cat(expected), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(got[x.shape[0] :]) == 0


def test_route_flat_without_boundaries_is_one_sequence():
    deltas = torch.randn(K, D_OUT, D_IN)
    x = torch.randn(6, D_IN)
    routed = _routed(deltas, torch.full((K,), 0.5), "mean")
    expected = routed(x.unsqueeze(0))[0] - x @ routed.weight.T
    torch.testing.assert_close(route_flat(x, deltas, torch.full((K,), 0.5), None), expected)


def test_route_flat_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="unknown router reduction 'median'"):
        route_flat(torch.randn(2, D_IN), torch.randn(1, D_OUT, D_IN), torch.ones(1), None, "median")


def _memory(i, n_edits=2):
    return Memory(
        torch.randn(D_OUT, D_IN),
        edit_ids=[f"e{i}-{j}" for j in range(n_edits)],
        prompts=["p"] * n_edits,
        targets=["t"] * n_edits,
        shard_ids=[i],
        threshold=1.0 + i,
    )


def test_package_sends_only_memories_not_held():
    mems = [_memory(i) for i in range(3)]
    snap = ServingSnapshot.from_memories("model.layers.1.mlp.down_proj", "mean", mems)
    assert snap.n_edits == 6 and len(set(snap.ids)) == 3
    header, tensors = decode_package(encode_package(snap, 7, held=snap.ids[:2]))
    assert header["version"] == 7 and header["ids"] == list(snap.ids) and header["sent"] == [snap.ids[2]]
    torch.testing.assert_close(tensors[f"delta.{snap.ids[2]}"], mems[2].delta)
    torch.testing.assert_close(tensors["thresholds"], torch.tensor([1.0, 2.0, 3.0]))
    full, _ = decode_package(encode_package(snap, 8))
    assert full["sent"] == list(snap.ids)


def test_memory_id_changes_with_content():
    m = _memory(0)
    same = Memory(m.delta.clone(), list(m.edit_ids), m.prompts, m.targets, [0], 5.0)
    assert memory_id(m) == memory_id(same)  # the threshold is not content: it travels separately
    changed = Memory(m.delta + 1e-3, list(m.edit_ids), m.prompts, m.targets, [0], 1.0)
    assert memory_id(m) != memory_id(changed)


def test_snapshot_without_edits_and_bad_packages_are_refused():
    with pytest.raises(PublishError, match="nothing to serve"):
        ServingSnapshot.from_memories("m", "mean", [Memory(torch.zeros(2, 2))])
    with pytest.raises(PublishError, match="not a wisestream publish package"):
        decode_package(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")


def test_residual_keyed_states_need_their_key_width_and_packages_a_known_relation_key():
    from wise.config import WiseConfig

    cfg = WiseConfig.model_validate({"keyed": {"relation_key": "residual"}}).model_dump()
    mem = Memory(torch.zeros(4, 4), shard_ids=[0], edit_ids=["e0"])
    with pytest.raises(PublishError, match="residual-keyed state without its key_width"):
        snapshot_of(cfg, "model.layers.2.mlp.down_proj", [mem], {})
    snap = ServingSnapshot.from_memories("m", "mean", [Memory(torch.zeros(2, 2), edit_ids=["e0"])])
    package = encode_package(dataclasses.replace(snap, relation_key="final"), 1)
    with pytest.raises(PublishError, match="unknown relation key 'final'; choose one of"):
        decode_package(package)
