"""Repeat detection: the post-hoc and the streaming detector against a brute-force reference, and by hand."""

import random

import pytest
import torch

from k15_plugin.core.repeats import RepeatDetector, RepeatRule, first_repeat


def brute_force(tokens, rule):
    """Shortest prefix whose end is need(p) back-to-back copies of one block, by slicing: no run counters."""
    for end in range(1, len(tokens) + 1):
        for p in range(rule.min_period, rule.max_period + 1):
            copies = rule.copies_needed(p)
            if copies * p > end:
                continue
            tail = tokens[end - copies * p : end]
            block = tail[:p]
            if all(tail[i * p : (i + 1) * p] == block for i in range(copies)):
                return end
    return None


def test_by_hand():
    rule = RepeatRule(min_period=2, max_period=4, min_count=3, min_span=6)
    # "1 2" three times: 6 tokens, period 2, 3 copies -> fires at the 6th token of the loop
    assert first_repeat([9, 8, 1, 2, 1, 2, 1, 2, 5], rule) == 8
    assert first_repeat([9, 8, 1, 2, 1, 2, 5, 1, 2], rule) is None  # two copies, then broken
    # period 1 is below min_period, but a run of one token is also a loop of "7 7": it fires once three copies of
    # that block (6 tokens) are there, not before
    assert first_repeat([7] * 5, rule) is None
    assert first_repeat([7] * 6, rule) == 6
    # a short period needs the minimum span: "3 4" three times is 6 < 8 tokens, four times fires
    span = RepeatRule(min_period=2, max_period=2, min_count=3, min_span=8)
    assert span.copies_needed(2) == 4 and span.run_needed(2) == 6
    assert first_repeat([3, 4] * 3, span) is None
    assert first_repeat([3, 4] * 4, span) == 8


def test_rule_is_validated():
    for bad in (dict(min_period=0), dict(min_period=5, max_period=4), dict(min_count=1), dict(min_span=0)):
        with pytest.raises(ValueError):
            RepeatRule(**bad)


def _sequences(count, seed):
    """Random sequences over small vocabularies (accidental repeats) and planted loops straddling random places."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        vocab = rng.choice([2, 3, 5, 50])
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        if i % 2:
            block = [rng.randrange(vocab) for _ in range(rng.randrange(1, 7))]
            at = rng.randrange(len(tokens) + 1)
            tokens[at:at] = block * rng.randrange(2, 6)
        out.append(tokens)
    return out


@pytest.mark.parametrize("rule", [RepeatRule(1, 6, 3, 1), RepeatRule(2, 5, 2, 8), RepeatRule(3, 8, 4, 12)])
def test_post_hoc_and_streaming_equal_the_brute_force(rule):
    sequences = _sequences(200, seed=rule.max_period)
    expected = [brute_force(s, rule) for s in sequences]
    assert [first_repeat(s, rule) for s in sequences] == expected
    assert any(e is not None for e in expected) and any(e is None for e in expected)
    # streaming, all rows at once: pad every row to the longest with fresh tokens that cannot extend a loop
    width = max(map(len, sequences))
    rows = torch.tensor([s + [1000 + i + j for j in range(width - len(s))] for i, s in enumerate(sequences)])
    first = RepeatDetector(len(sequences), rule).scan(rows).tolist()
    assert [f if f > 0 and f <= len(s) else None for f, s in zip(first, sequences, strict=True)] == expected


def test_streaming_one_token_at_a_time_reports_the_step():
    rule = RepeatRule(min_period=2, max_period=3, min_count=3, min_span=1)
    detector = RepeatDetector(2, rule)
    rows = [[5, 1, 2, 1, 2, 1, 2, 9], [5, 6, 7, 8, 9, 10, 11, 12]]
    hits = [detector.update(torch.tensor(column)).tolist() for column in zip(*rows, strict=True)]
    assert [h[0] for h in hits] == [False] * 6 + [True, False]  # fires on the loop's 6th token; the 9 breaks it
    assert not any(h[1] for h in hits)
