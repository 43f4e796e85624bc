"""A final-answer exact-match reward for math-style datasets (GSM8K "####", MATH \\boxed{}, last number).

A light, dependency-free checker: the final answer is extracted from the completion and from the reference and
compared after normalisation (whitespace, thousands separators, a trailing period, ``$``, numeric equality for
numbers). It does not understand LaTeX equivalence; a math-verify based checker is the stronger choice for MATH.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from k15_plugin.rewards.math import completion_text, last_boxed

EXTRACTIONS = ("last_number", "gsm8k", "boxed")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_answer(text: str, extraction: str) -> str | None:
    r"""The final answer in ``text`` by ``extraction`` (``last_number``, ``gsm8k`` or ``boxed``), or None.

    ``last_number``: the last number (sign, thousands separators and decimals kept); ``gsm8k``: the last number after
    the last ``####`` (None without one); ``boxed``: the content of the last ``\boxed{}``. Non-string ``text`` gives
    None; an unknown ``extraction`` raises ValueError.

    Example:
    ```python
    >>> from k15_plugin.rewards.answer import extract_answer
    >>> extract_answer("3 boxes of 412 make 1,236.", "last_number")
    '1,236'
    >>> extract_answer("48 + 24 = 72\n#### 72", "gsm8k")
    '72'
    >>> extract_answer(r"so x = \boxed{\frac{1}{2}}", "boxed")
    '\\frac{1}{2}'
    >>> print(extract_answer("no number here", "last_number"))
    None

    ```
    """
    if extraction not in EXTRACTIONS:
        raise ValueError(f"extraction must be one of {list(EXTRACTIONS)}, got {extraction!r}")
    if not isinstance(text, str):
        return None
    if extraction == "boxed":
        return last_boxed(text)
    if extraction == "gsm8k":
        if "####" in text:
            text = text.rsplit("####", 1)[1]
        else:
            return None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """The form in which two answers are compared: surrounding whitespace and ``$``, a trailing period, inner spaces
    and commas (thousands separators) removed; a number then becomes its canonical text (``1000`` for ``1,000.0``,
    ``0.5`` for ``.50``), so numerically equal answers compare equal. Anything else stays text (no LaTeX
    equivalence: ``\\frac{1}{2}`` is not ``0.5`` here).

    Example:
    ```python
    >>> from k15_plugin.rewards.answer import normalize_answer
    >>> normalize_answer(" 1,000. "), normalize_answer("$18$"), normalize_answer(".50"), normalize_answer("-3.0")
    ('1000', '18', '0.5', '-3')
    >>> normalize_answer("x = 5")
    'x=5'

    ```
    """
    s = answer.strip().strip("$").rstrip(".").replace(" ", "").replace(",", "")
    try:
        value = float(s)
    except ValueError:
        return s
    return str(int(value)) if value == int(value) else repr(value)


class AnswerMatchReward:
    """TRL reward function: 1.0 when the completion's final answer matches the reference answer column, else 0.0.

    ``reference_extraction`` applies to the dataset column (e.g. GSM8K's worked solutions end in "#### 42");
    references already reduced to the bare answer pass through ``None``. Picklable; never raises on bad samples.
    Called by TRL as ``reward(completions, answer=[...], **other_columns)``; completions may be strings or chat
    message lists. Raises TypeError without an ``answer`` column, ValueError for an unknown extraction.

    Example:
    ```python
    >>> from k15_plugin.rewards.answer import AnswerMatchReward
    >>> reward = AnswerMatchReward()
    >>> reward(["so the answer is 1,000.", "it is 999", None], answer=["1000", "1000", "1000"])
    [1.0, 0.0, 0.0]
    >>> gsm8k = AnswerMatchReward(extraction="gsm8k", reference_extraction="gsm8k")
    >>> gsm8k(["6 * 12 = 72\\n#### 72"], answer=["48 + 24 = 72\\n#### 72"])
    [1.0]

    ```
    """

    def __init__(self, extraction: str = "last_number", reference_extraction: str | None = None):
        for name, value in (("extraction", extraction), ("reference_extraction", reference_extraction)):
            if value is not None and value not in EXTRACTIONS:
                raise ValueError(f"{name} must be one of {list(EXTRACTIONS)}, got {value!r}")
        self.extraction = extraction
        self.reference_extraction = reference_extraction
        self.__name__ = "answer_match"

    def score(self, completion: Any, reference: Any) -> float:
        """1.0 when ``completion``'s extracted answer equals ``reference``'s after :func:`normalize_answer`, else 0.0;
        0.0 also when either has no answer or anything fails (a reward must never stop training)."""
        try:
            ref = str(reference)
            if self.reference_extraction is not None:
                ref = extract_answer(ref, self.reference_extraction)
            got = extract_answer(completion_text(completion), self.extraction)
            if got is None or ref is None:
                return 0.0
            return 1.0 if normalize_answer(got) == normalize_answer(ref) else 0.0
        except Exception:  # a reward must never take training down
            return 0.0

    def __call__(self, completions: Sequence[Any], answer: Sequence[Any] | None = None, **kwargs: Any) -> list[float]:
        if answer is None:
            raise TypeError("AnswerMatchReward needs the dataset's `answer` column")
        return [self.score(c, a) for c, a in zip(completions, answer, strict=True)]
