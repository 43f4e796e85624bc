"""``reward_func(queries, prompts, labels)`` for OpenRLHF's ``--reward.remote_url <file>.py``, over k15_plugin.rewards.

OpenRLHF loads the file named by ``--reward.remote_url`` in every vLLM actor and calls ``reward_func`` per sample with
the decoded prompt + response (``queries``), the prompt and the dataset's label column. This module as the file
scores math answers with math-verify; ``k15-train host=openrlhf`` writes a two-line file per run that calls
:func:`make_reward_func` with the run's verifier (``reward.verifier``: task, math or code) instead.

The returned ``scores`` (correctness in [0, 1]) are what the k1.5 length penalty and the samplers count as correct.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch


def completion_of(query: str, prompt: str) -> str:
    """The response part of OpenRLHF's decoded prompt + response."""
    at = query.rfind(prompt) if prompt else -1
    return query[at + len(prompt) :] if at >= 0 else query


def _scorer(spec: dict) -> Callable[[list[str], list[Any]], list[float]]:
    verifier = spec.get("verifier", "math")
    if verifier == "task":
        from k15_plugin.rewards.answer import AnswerMatchReward

        reward = AnswerMatchReward(extraction=spec.get("extraction") or "last_number")
        return lambda completions, labels: reward(completions, answer=labels)
    if verifier == "math":
        from k15_plugin.rewards import get_math_reward

        reward = get_math_reward(extraction=spec.get("extraction") or "auto",
                                 timeout_seconds=float(spec.get("timeout_seconds", 5.0)))  # fmt: skip
        return lambda completions, labels: reward(completions, answer=labels)
    if verifier == "code":
        from k15_plugin.rewards import SandboxConfig, get_code_reward

        sandbox = dict(spec.get("sandbox", {}))
        sandbox["allow_paths"] = tuple(sandbox.get("allow_paths", ()))
        partial_credit = bool(spec.get("partial_credit", True))
        reward = get_code_reward(partial_credit=partial_credit, sandbox=SandboxConfig(**sandbox))

        def score(completions, labels):
            tests = [json.loads(label) if isinstance(label, str) else label for label in labels]
            return reward(completions, tests=tests)

        return score
    raise ValueError(f"verifier must be task, math or code, got {verifier!r}")


def make_reward_func(spec: dict | None = None) -> Callable:
    """An OpenRLHF ``reward_func`` for ``spec`` (``{"verifier": "math", "extraction": "auto", ...}``)."""
    score = _scorer(dict(spec or {}))

    def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs) -> dict:
        completions = [completion_of(q, p) for q, p in zip(queries, prompts, strict=True)]
        values = torch.tensor(score(completions, list(labels)), dtype=torch.float32)
        return {"rewards": values, "scores": values, "extra_logs": {"k15/correct": values}}

    return reward_func


reward_func = make_reward_func({"verifier": "math"})
