"""k15_plugin.core.long2short: the paper's selection rules, by hand."""

import pytest

from k15_plugin.core.long2short import Sample, dpo_negatives, shortest_correct

# one prompt's 8 samples: (tokens, correct, truncated)
SAMPLES = [
    Sample(t, c, tr)
    for t, c, tr in [
        (12, True, False),
        (7, False, False),
        (6, True, False),
        (9, True, False),
        (6, True, False),
        (20, False, True),
        (4, True, True),
        (15, True, False),
    ]
]


def test_shortest_correct_skips_wrong_and_truncated_and_breaks_ties_by_index():
    # index 6 (4 tokens) is correct but cut at the limit; indices 2 and 4 tie at 6 tokens: the first wins
    assert shortest_correct(SAMPLES) == 2
    assert shortest_correct([Sample(3, False), Sample(5, True, True)]) is None
    assert shortest_correct([]) is None


def test_dpo_negatives_follow_the_paper_longer_wrong_and_1_5x_longer_correct():
    positive, negatives = dpo_negatives(SAMPLES)
    # positive: sample 2 (6 tokens; sample 4 ties and loses on index). Negatives: wrong 1 (7 > 6 tokens); truncated 5
    # (20 > 6: unfinished counts as wrong); correct with >= 1.5 x 6 = 9 tokens: 0 (12), 3 (9), 7 (15).
    # Not negatives: 4 (correct, 6 < 9 tokens) and 6 (truncated, so wrong, but 4 tokens: shorter than the positive).
    assert positive == 2
    assert negatives == [0, 1, 3, 5, 7]
    assert dpo_negatives(SAMPLES, ratio=2.0)[1] == [0, 1, 5, 7]  # 2 x 6 = 12: sample 3 (9) is no longer a negative
    assert dpo_negatives([Sample(5, False)]) == (None, [])


def test_dpo_negatives_leave_out_wrong_answers_no_longer_than_the_positive():
    # positive 0 (5 tokens); wrong ones of 5 (equal), 3 (shorter) and 6 (longer) tokens; a correct one of 7 < 7.5
    samples = [Sample(5, True), Sample(5, False), Sample(3, False), Sample(6, False), Sample(7, True)]
    assert dpo_negatives(samples) == (0, [3])  # only the wrong one longer than 5 tokens
    assert dpo_negatives(samples, rule="paper") == (0, [3])


def test_dpo_negatives_any_wrong_takes_every_wrong_sample():
    # the variant kept to compare: wrong samples of any length, the correct ones as in the paper
    assert dpo_negatives(SAMPLES, rule="any_wrong") == (2, [0, 1, 3, 5, 6, 7])  # + 6 (truncated, 4 tokens)
    assert dpo_negatives(SAMPLES, ratio=2.0, rule="any_wrong")[1] == [0, 1, 5, 6, 7]
    samples = [Sample(5, True), Sample(5, False), Sample(3, False), Sample(6, False), Sample(7, True)]
    assert dpo_negatives(samples, rule="any_wrong") == (0, [1, 2, 3])  # 7 < 1.5 x 5: sample 4 in neither rule


def test_bad_inputs():
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        dpo_negatives(SAMPLES, ratio=0.5)
    with pytest.raises(ValueError, match=r"rule must be one of \['paper', 'any_wrong'\], got 'shorter'"):
        dpo_negatives(SAMPLES, rule="shorter")
    with pytest.raises(ValueError, match="sample 0: tokens"):
        shortest_correct([Sample(-1, True)])
