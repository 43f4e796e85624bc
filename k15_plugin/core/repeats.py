"""Repeat detection for long generations (paper section 2.6.2: "repeat detection ... identifies repetitive sequences
in the generated content and terminates them early").

A generation *repeats* at token t when the tokens up to t end in back-to-back copies of one block: ``need(p)``
copies of a block of ``p`` tokens, for some period ``p`` in ``[min_period, max_period]``, where
``need(p) = max(min_count, ceil(min_span / p))``. Short periods thus need a long run (``7 7 7`` in a number is not a
loop, 64 dots in a row are), and a run of one token is also a loop of any longer period, so ``min_period`` does not
exempt it. Equivalently: the last ``(need(p) - 1) * p`` tokens each equal the token ``p`` before them.

Two implementations of that one rule, checked against each other and against a brute-force reference in the tests:

* :func:`first_repeat`: post hoc, on one sequence of token ids (the tail of a prefix plus a new segment, say);
* :class:`RepeatDetector`: streaming, one token per row per call, vectorized over rows and periods (for a
  generation loop's stopping criterion). Per token it compares the new token with the last ``max_period`` ones and
  keeps, per period, how many newest tokens in a row matched: ``O(rows * max_period)`` work, no loop over periods.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RepeatRule:
    """When a tail counts as a loop. The defaults follow the opt-in profile llama.cpp proposed after vLLM's
    repetition detection (periods 16-1024, 4 copies), with a 64-token minimum span; for the demo's tiny vocabulary
    lower ``min_period``."""

    min_period: int = 16
    max_period: int = 1024
    min_count: int = 4
    min_span: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min_period <= self.max_period:
            raise ValueError(f"need 1 <= min_period <= max_period, got {self.min_period} and {self.max_period}")
        if self.min_count < 2:
            raise ValueError(f"min_count must be >= 2 (one copy is no repeat), got {self.min_count}")
        if self.min_span < 1:
            raise ValueError(f"min_span must be >= 1, got {self.min_span}")

    def copies_needed(self, period: int) -> int:
        """``need(period)``: back-to-back copies of a ``period``-token block that make a loop, at least ``min_count``
        and enough to span ``min_span`` tokens."""
        return max(self.min_count, math.ceil(self.min_span / period))

    def run_needed(self, period: int) -> int:
        """How many newest tokens in a row must equal the token ``period`` before them."""
        return (self.copies_needed(period) - 1) * period


def first_repeat(tokens: Sequence[int], rule: RepeatRule) -> int | None:
    """The length of the shortest prefix of ``tokens`` that ends in a repeat, or None: cut there to stop the loop
    with its copies in (the penalty is for having looped). Plain Python, ``O(len(tokens) * max_period)``: for long
    generations or many rows use :meth:`RepeatDetector.scan`."""
    periods = range(rule.min_period, rule.max_period + 1)
    needed = {p: rule.run_needed(p) for p in periods}
    run = dict.fromkeys(periods, 0)
    for t, token in enumerate(tokens):
        for p in periods:
            run[p] = run[p] + 1 if t >= p and tokens[t - p] == token else 0
            if run[p] >= needed[p]:
                return t + 1
    return None


class RepeatDetector:
    """Streaming :func:`first_repeat` for ``rows`` generations at once: call :meth:`update` with each new token."""

    def __init__(self, rows: int, rule: RepeatRule, device: torch.device | str | None = None) -> None:
        self.rule = rule
        periods = torch.arange(1, rule.max_period + 1, device=device)
        needed = torch.tensor([rule.run_needed(int(p)) for p in periods], device=device)
        # run_needed of periods below min_period: unreachable, so those columns never fire
        self.needed = torch.where(periods >= rule.min_period, needed, torch.iinfo(torch.long).max)
        self.history = torch.full((rows, rule.max_period), -1, dtype=torch.long, device=device)  # [:, p-1]: t-p
        self.run = torch.zeros((rows, rule.max_period), dtype=torch.long, device=device)
        self.length = 0

    def update(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``: the next token of each row, shape ``(rows,)``. Returns a bool ``(rows,)``: a repeat ends here.

        A row keeps answering True after its first repeat as long as the loop goes on; stop feeding it (or ignore
        it) once it fired."""
        tokens = tokens.to(self.history.device, torch.long)
        matches = self.history == tokens[:, None]  # -1 (no token yet) never matches a token id
        self.run = torch.where(matches, self.run + 1, 0)
        self.history = torch.cat([tokens[:, None], self.history[:, :-1]], dim=1)
        self.length += 1
        return (self.run >= self.needed).any(dim=1)

    def scan(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``(rows, n)`` column by column; per row, the length of the shortest prefix that ends in a
        repeat (counted from this detector's first token), or -1."""
        first = torch.full((tokens.shape[0],), -1, dtype=torch.long, device=self.history.device)
        for column in tokens.T:
            hit = self.update(column)
            first = torch.where((first < 0) & hit, self.length, first)
        return first
