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
    """The final answer in ``text`` by ``extraction`` (``last_number``, ``gsm8k`` or ``boxed``), or None."""
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
    """

    def __init__(self, extraction: str = "last_number", reference_extraction: str | None = None):
        for name, value in (("extraction", extraction), ("reference_extraction", reference_extraction)):
            if value is not None and value not in EXTRACTIONS:
                raise ValueError(f"{name} must be one of {list(EXTRACTIONS)}, got {value!r}")
        self.extraction = extraction
        self.reference_extraction = reference_extraction
        self.__name__ = "answer_match"

    def score(self, completion: Any, reference: Any) -> float:
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
