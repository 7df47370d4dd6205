import pytest
import torch
from torch import nn

from wise.router import RoutedLinear, reduce_span, token_activation


def _routed(deltas, thresholds, reduce="mean"):
    base = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    r = RoutedLinear(base, reduce=reduce)
    r.set_memories(torch.stack(deltas), torch.tensor(thresholds))
    return r


def test_reduce_span_mean_max_last():
    v = torch.tensor([[1.0, 5.0, 3.0, 9.0]])
    span = torch.tensor([[True, True, True, False]])
    assert reduce_span(v, span, "mean").item() == 3.0
    assert reduce_span(v, span, "max").item() == 5.0
    assert reduce_span(v, span, "last").item() == 3.0
    assert reduce_span(v, torch.zeros_like(span), "mean").item() == 0.0


def test_router_picks_memory_per_sequence_and_falls_back_to_main():
    # memory 0 reacts to feature 2, memory 1 to feature 0
    d0 = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    d1 = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    r = _routed([d0, d1], [1.0, 1.0])
    a = torch.tensor(
        [
            [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]],  # -> memory 0 (activation 2 >= 1)
            [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]],  # -> memory 1 (activation 3)
            [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],  # -> main (activations 0)
            [[0.0, 0.0, 0.2], [0.0, 0.0, 0.2]],  # -> main (0.4 < 1)
        ]
    )
    out = r(a)
    assert r.last_choice.tolist() == [0, 1, -1, -1]
    main = a @ r.weight.T
    assert torch.allclose(out[0], main[0] + a[0] @ d0.T)
    assert torch.allclose(out[1], main[1] + a[1] @ d1.T)
    assert torch.allclose(out[2:], main[2:])


def test_router_uses_ratio_to_threshold_and_query_span():
    d0 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    d1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    r = _routed([d0, d1], [4.0, 1.0])
    # raw activation of memory 0 is higher (3 vs 2) but memory 1 is further above its own threshold
    a = torch.tensor([[[2.0, 0.0, 3.0], [2.0, 0.0, 3.0]]])
    r(a)
    assert r.last_choice.tolist() == [1]
    # a span restricted to a token without the feature keeps the sequence on main memory
    a2 = torch.tensor([[[0.0, 1.0, 0.0], [5.0, 0.0, 0.0]]])
    with r.query_span(torch.tensor([[True, False]])):
        r(a2)
    assert r.last_choice.tolist() == [-1]
    r(a2)  # whole sequence: mean activation 2.5 >= 1
    assert r.last_choice.tolist() == [1]


def test_main_only_and_empty_memories():
    d0 = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    r = _routed([d0], [0.1])
    a = torch.ones(2, 3, 3)
    with r.main_only():
        assert torch.allclose(r(a), a @ r.weight.T)
    assert not torch.allclose(r(a), a @ r.weight.T)
    r.set_memories(torch.zeros(0, 2, 3), torch.zeros(0))
    assert torch.allclose(r(a), a @ r.weight.T)
    assert r.last_choice.tolist() == [-1, -1]


@pytest.mark.parametrize("reduce", ["mean", "max", "last"])
@pytest.mark.parametrize("transposed", [False, True])
def test_span_scores_equal_per_token_activations_reduced_over_the_span(reduce, transposed):
    # scores() scores only the span's tokens; it must equal every token's ||Delta a_t|| reduced over the span
    torch.manual_seed(3)
    d_out, d_in, k = 4, 6, 5
    base = nn.Linear(d_in, d_out, bias=False)
    if transposed:
        base.weight = nn.Parameter(base.weight.detach().T.contiguous())
    r = RoutedLinear(base, transposed=transposed, reduce=reduce)
    deltas = torch.randn(k, *base.weight.shape)
    r.set_memories(deltas, torch.ones(k))
    a = torch.randn(3, 7, d_in)
    span = torch.rand(3, 7) > 0.4
    span[2] = False  # an empty span scores 0
    expected = torch.stack([reduce_span(token_activation(a, d, transposed), span, reduce) for d in deltas])
    with r.query_span(span):
        got = r.scores(a)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(got[:, 2], torch.zeros(k))


def test_hold_route_keeps_the_first_decision_until_the_block_ends():
    d0 = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    r = _routed([d0], [1.0])
    to_memory = torch.tensor([[[0.0, 0.0, 1.0]]])
    to_main = torch.tensor([[[0.0, 1.0, 0.0]]])
    with r.hold_route():
        r(to_memory)
        assert r.last_choice.tolist() == [0]
        out = r(to_main)  # held: still memory 0, whose contribution on this input is 0
        assert r.last_choice.tolist() == [0]
        assert torch.allclose(out, to_main @ r.weight.T)
        with r.hold_route():  # a nested block decides afresh and restores the outer decision after
            r(to_main)
            assert r.last_choice.tolist() == [-1]
        r(to_main)
        assert r.last_choice.tolist() == [0]
        with pytest.raises(ValueError, match="held route is for 1 sequences, this forward has 2"):
            r(to_main.repeat(2, 1, 1))
    r(to_main)
    assert r.last_choice.tolist() == [-1]
