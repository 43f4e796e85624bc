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


def test_dpo_negatives_are_wrong_answers_and_correct_ones_at_least_1_5x_longer():
    positive, negatives = dpo_negatives(SAMPLES)
    # positive: 6 tokens. Negatives: wrong 1 (7 tokens); truncated 5 and 6 (unfinished counts as wrong, whatever
    # the verifier said); correct with >= 9 tokens: 0 (12), 3 (9), 7 (15). Not a negative: 4 (correct, 6 tokens).
    assert positive == 2
    assert negatives == [0, 1, 3, 5, 6, 7]
    assert dpo_negatives(SAMPLES, ratio=2.0)[1] == [0, 1, 5, 6, 7]  # 9 < 12: sample 3 is no longer a negative
    assert dpo_negatives([Sample(5, False)]) == (None, [])


def test_bad_inputs():
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        dpo_negatives(SAMPLES, ratio=0.5)
    with pytest.raises(ValueError, match="sample 0: tokens"):
        shortest_correct([Sample(-1, True)])
