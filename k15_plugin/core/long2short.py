"""Sample selection for long2short (paper section 2.4): shortest rejection sampling and the DPO pairs.

Pure functions over one prompt's n samples (the paper samples n = 8), each described by its length in generated
tokens (including EOS) and whether a verifier found it correct:

* **shortest rejection sampling**: the shortest correct sample is the fine-tuning target (:func:`shortest_correct`);
* **DPO**: the positive is the shortest correct sample; the negatives are the *longer* responses: the wrong samples
  longer than the positive and the correct ones at least ``ratio`` (1.5, the paper's) times longer
  (:func:`dpo_negatives`). The paper: "The shortest correct solution is selected as the positive sample, while longer
  responses are treated as negative samples, including both wrong longer responses and correct longer responses (1.5
  times longer than the chosen positive sample)."

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


DPO_RULES = ("paper", "any_wrong")  # the negatives rules of dpo_negatives


def dpo_negatives(samples: Sequence[Sample], ratio: float = 1.5, rule: str = "paper") -> tuple[int | None, list[int]]:
    """``(positive, negatives)``: the shortest correct sample and the indices that may be paired against it.

    A wrong sample is one the verifier rejected or one cut at the length limit (``truncated``: it did not finish).

    * ``rule="paper"`` (the default): the wrong samples with more tokens than the positive and the correct ones with
      at least ``ratio`` times its tokens. A wrong sample as short as the positive or shorter is no negative: a pair
      against it would teach the model to prefer the longer answer.
    * ``rule="any_wrong"``: every wrong sample whatever its length (the shorter ones too, which the paper leaves
      out), and the same correct ones: a variant to compare against, not the paper's.

    No positive: ``(None, [])``.

    Example (positive: sample 1, 6 tokens; 1.5 x 6 = 9):
    ```python
    >>> from k15_plugin.core.long2short import Sample, dpo_negatives
    >>> s = [Sample(4, False), Sample(6, True), Sample(7, False), Sample(8, True), Sample(9, True)]
    >>> dpo_negatives(s)
    (1, [2, 4])
    >>> dpo_negatives(s, rule="any_wrong")
    (1, [0, 2, 4])

    ```
    """
    if not ratio >= 1:
        raise ValueError(f"ratio must be >= 1, got {ratio!r}")
    if rule not in DPO_RULES:
        raise ValueError(f"rule must be one of {list(DPO_RULES)}, got {rule!r}")
    positive = shortest_correct(samples)
    if positive is None:
        return None, []
    length = samples[positive].tokens
    bound = ratio * length
    min_wrong = length + 1 if rule == "paper" else 0  # "wrong longer responses"
    negatives = [
        i
        for i, s in enumerate(samples)
        if i != positive and (s.tokens >= min_wrong if (not s.correct or s.truncated) else s.tokens >= bound)
    ]
    return positive, negatives
