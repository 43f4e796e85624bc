"""Sample selection for long2short (paper section 2.4): shortest rejection sampling and the DPO pairs.

Pure functions over one prompt's n samples (the paper samples n = 8), each described by its length in generated
tokens (including EOS) and whether a verifier found it correct:

* **shortest rejection sampling**: the shortest correct sample is the fine-tuning target (:func:`shortest_correct`);
* **DPO**: the positive is the shortest correct sample; the negatives are the wrong samples and the correct ones at
  least ``ratio`` (1.5, the paper's) times longer than the positive (:func:`dpo_negatives`).

A sample cut at the length limit (``truncated``) never becomes a positive: it did not finish. Ties go to the lowest
sample index, so the selection is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One of a prompt's samples as the selection sees it: its length, whether it is correct, whether it was cut."""

    tokens: int  # generated tokens, EOS included
    correct: bool
    truncated: bool = False


def _check(samples: Sequence[Sample]) -> None:
    for i, s in enumerate(samples):
        if isinstance(s.tokens, bool) or not isinstance(s.tokens, int) or s.tokens < 0:
            raise ValueError(f"sample {i}: tokens must be an integer >= 0, got {s.tokens!r}")


def shortest_correct(samples: Sequence[Sample]) -> int | None:
    """Index of the shortest correct, finished sample (lowest index on ties); None when there is none."""
    _check(samples)
    candidates = [(s.tokens, i) for i, s in enumerate(samples) if s.correct and not s.truncated]
    return min(candidates)[1] if candidates else None


def dpo_negatives(samples: Sequence[Sample], ratio: float = 1.5) -> tuple[int | None, list[int]]:
    """``(positive, negatives)``: the shortest correct sample and the indices that may be paired against it.

    Negatives are every wrong sample (truncated ones included) and every correct sample with at least ``ratio``
    times the positive's tokens. No positive: ``(None, [])``.
    """
    if not ratio >= 1:
        raise ValueError(f"ratio must be >= 1, got {ratio!r}")
    positive = shortest_correct(samples)
    if positive is None:
        return None, []
    bound = ratio * samples[positive].tokens
    negatives = [
        i for i, s in enumerate(samples) if i != positive and (not s.correct or s.truncated or s.tokens >= bound)
    ]
    return positive, negatives
