"""Training rows from sampled completions: the SFT rows of shortest rejection sampling and the DPO pairs.

A *samples* row (what ``k15-long2short sample`` writes) is the input row plus ``samples``: one
``{"text", "tokens", "reward", "correct", "truncated"}`` per completion, ``tokens`` counting the generated ids with
EOS. The selection rules are :mod:`k15_plugin.core.long2short`'s; these functions only turn them into TRL's dataset
formats: ``{"prompt", "completion"}`` (SFT) and ``{"prompt", "chosen", "rejected"}`` (DPO), as plain strings, or as
chat messages when the prompt is a message list (TRL's conversational format).
"""

from __future__ import annotations

import random
from typing import Any

from k15_plugin.core.long2short import DPO_RULES, Sample, dpo_negatives, shortest_correct
from k15_plugin.long2short.data import Long2ShortError

SELECT = ("shortest", "random")


def _samples(row: dict, number: int, path: str) -> list[Sample]:
    samples = row.get("samples")
    if not isinstance(samples, list) or not samples:
        raise Long2ShortError(f"{path}: row {number} has no 'samples' list (write it with k15-long2short sample)")
    out = []
    for j, s in enumerate(samples):
        if not isinstance(s, dict) or not {"text", "tokens", "correct"} <= set(s):
            raise Long2ShortError(f"{path}: row {number} sample {j} needs 'text', 'tokens' and 'correct'")
        if isinstance(s["tokens"], bool) or not isinstance(s["tokens"], int) or s["tokens"] < 0:
            raise Long2ShortError(f"{path}: row {number} sample {j}: 'tokens' must be an integer >= 0")
        out.append(Sample(tokens=s["tokens"], correct=bool(s["correct"]), truncated=bool(s.get("truncated", False))))
    return out


def _completion(prompt: Any, text: str) -> Any:
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def sft_rows(rows: list[dict], path: str, select: str = "shortest", seed: int = 0) -> tuple[list[dict], dict]:
    """One SFT row per prompt with a correct finished sample: the shortest (``shortest``, the paper's shortest
    rejection sampling) or any one at random (``random``, the control: same data, no preference for brevity).
    Returns the rows and counts."""
    if select not in SELECT:
        raise Long2ShortError(f"--select {select}: not one of {list(SELECT)}")
    rng = random.Random(seed)
    out = []
    for number, row in enumerate(rows, 1):
        samples = _samples(row, number, path)
        if select == "shortest":
            chosen = shortest_correct(samples)
        else:
            correct = [i for i, s in enumerate(samples) if s.correct and not s.truncated]
            chosen = rng.choice(correct) if correct else None
        if chosen is None:
            continue
        text = row["samples"][chosen]["text"]
        out.append(
            {
                "prompt": row["prompt"],
                "completion": _completion(row["prompt"], text),
                "tokens": samples[chosen].tokens,
                "n_correct": sum(s.correct and not s.truncated for s in samples),
            }
        )
    tokens = [r["tokens"] for r in out]
    return out, {
        "prompts": len(rows),
        "rows": len(out),
        "dropped_no_correct": len(rows) - len(out),
        "mean_tokens": sum(tokens) / max(len(tokens), 1),
    }


def dpo_rows(
    rows: list[dict],
    path: str,
    ratio: float = 1.5,
    pairs_per_prompt: int | None = 1,
    seed: int = 0,
    rule: str = "paper",
) -> tuple[list[dict], dict]:
    """DPO pairs: chosen = the shortest correct sample; rejected = one of its negatives under ``rule``
    (:func:`~k15_plugin.core.long2short.dpo_negatives`; ``paper``: a wrong sample longer than the chosen one or a
    correct one at least ``ratio`` times longer; ``any_wrong``: any wrong sample, shorter ones too),
    ``pairs_per_prompt`` of them drawn at random per prompt (None: all). Returns the rows and counts."""
    if not ratio >= 1:
        raise Long2ShortError(f"--ratio must be >= 1, got {ratio}")
    if rule not in DPO_RULES:
        raise Long2ShortError(f"--rule {rule}: not one of {list(DPO_RULES)}")
    if pairs_per_prompt is not None and pairs_per_prompt < 1:
        raise Long2ShortError(f"--pairs-per-prompt must be >= 1 or 'all', got {pairs_per_prompt}")
    rng = random.Random(seed)
    out, no_positive, no_negative = [], 0, 0
    for number, row in enumerate(rows, 1):
        samples = _samples(row, number, path)
        positive, negatives = dpo_negatives(samples, ratio, rule)
        if positive is None:
            no_positive += 1
            continue
        if not negatives:
            no_negative += 1
            continue
        if pairs_per_prompt is not None and len(negatives) > pairs_per_prompt:
            negatives = sorted(rng.sample(negatives, pairs_per_prompt))
        prompt = row["prompt"]
        for j in negatives:
            out.append(
                {
                    "prompt": prompt,
                    "chosen": _completion(prompt, row["samples"][positive]["text"]),
                    "rejected": _completion(prompt, row["samples"][j]["text"]),
                    "chosen_tokens": samples[positive].tokens,
                    "rejected_tokens": samples[j].tokens,
                    "rejected_correct": samples[j].correct and not samples[j].truncated,
                }
            )
    return out, {
        "rule": rule,
        "prompts": len(rows),
        "pairs": len(out),
        "dropped_no_correct": no_positive,
        "dropped_no_negative": no_negative,
        "rejected_correct": sum(r["rejected_correct"] for r in out),
        # pairs whose rejected answer is no longer than the chosen one (none under the paper's rule)
        "rejected_not_longer": sum(r["rejected_tokens"] <= r["chosen_tokens"] for r in out),
    }
