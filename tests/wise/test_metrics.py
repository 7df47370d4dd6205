import pytest
import torch

from wise.evaluate import TokenPredictions, agreement, mean, token_accuracy


def _preds(rows):
    return TokenPredictions(
        [torch.tensor(p) for p, _ in rows],
        [torch.tensor(g) for _, g in rows],
        torch.zeros(len(rows)),
        torch.zeros(len(rows)),
    )


def test_teacher_forced_token_accuracy_is_per_edit_fraction_of_target_tokens():
    preds = _preds([([5, 6, 7], [5, 6, 8]), ([1], [1]), ([2, 3], [4, 5])])
    assert token_accuracy(preds) == pytest.approx([2 / 3, 1.0, 0.0])
    assert mean(token_accuracy(preds)) == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)


def test_locality_is_agreement_with_pre_edit_argmax_not_with_gold():
    before = _preds([([9, 9], [1, 2]), ([3], [3])])  # the pre-edit model was wrong on row 0: irrelevant
    after = _preds([([9, 4], [1, 2]), ([3], [3])])
    assert agreement(after, before) == [0.5, 1.0]


def test_mean_of_nothing_is_none_not_zero():
    assert mean([]) is None
