"""``reward_func(queries, prompts, labels)`` for OpenRLHF's ``--reward.remote_url <file>.py``, over k15_plugin.rewards.

OpenRLHF loads the file named by ``--reward.remote_url`` in every vLLM actor and calls ``reward_func`` per sample with
the decoded prompt + response (``queries``), the prompt and the dataset's label column. This module as the file
scores math answers with math-verify; ``k15-train host=openrlhf`` writes a two-line file per run that calls
:func:`make_reward_func` with the run's verifier (``reward.verifier``: task, math or code) instead.

The returned ``scores`` (correctness in [0, 1]) are what the k1.5 length penalty and the samplers count as correct.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from k15_plugin.rewards.registry import scorer


def completion_of(query: str, prompt: str) -> str:
    """The response part of OpenRLHF's decoded prompt + response: what follows the last copy of ``prompt``.

    Raises ValueError when the prompt is not in the query (a tokenizer whose decode does not give the prompt back, or
    a prompt OpenRLHF cut to ``data.max_len``): scoring the whole query would read the prompt as part of the answer.
    """
    if not prompt:
        return query
    at = query.rfind(prompt)
    if at < 0:
        raise ValueError(
            f"the reward file cannot find the prompt {prompt[:60]!r} in OpenRLHF's decoded query {query[:60]!r}: the "
            "tokenizer does not decode the prompt back to itself, or the prompt was cut (raise data.max_len)"
        )
    return query[at + len(prompt) :]


def make_reward_func(spec: dict | None = None) -> Callable:
    """An OpenRLHF ``reward_func`` for ``spec`` (``{"verifier": "math", "extraction": "auto", ...}``)."""
    score = scorer(dict(spec or {}))

    def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs) -> dict:
        completions = [completion_of(q, p) for q, p in zip(queries, prompts, strict=True)]
        values = torch.tensor(score(completions, list(labels)), dtype=torch.float32)
        return {"rewards": values, "scores": values, "extra_logs": {"k15/correct": values}}

    return reward_func


reward_func = make_reward_func({"verifier": "math"})
