"""One scoring function per verifier for hosts that call a reward per sample with a label string (OpenRLHF's
``reward_func``, verl's ``compute_score``): :func:`scorer` turns a small JSON-able spec into
``score(completions, labels) -> list[float]`` over :mod:`k15_plugin.rewards`.

Spec keys: ``verifier`` (``task``: answer match, ``math``: math-verify, ``code``: the sandbox), ``extraction`` (task,
math), ``timeout_seconds`` (math), ``partial_credit`` and ``sandbox`` (code: :class:`SandboxConfig` fields). For
``code`` a label is the test list, or that list as a JSON string.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def scorer(spec: dict) -> Callable[[list[str], list[Any]], list[float]]:
    """``score(completions, labels)`` for ``spec`` (see the module)."""
    verifier = spec.get("verifier", "math")
    if verifier == "task":
        from k15_plugin.rewards.answer import AnswerMatchReward

        reward = AnswerMatchReward(extraction=spec.get("extraction") or "last_number")
        return lambda completions, labels: reward(completions, answer=labels)
    if verifier == "math":
        from k15_plugin.rewards import get_math_reward

        reward = get_math_reward(
            extraction=spec.get("extraction") or "auto", timeout_seconds=float(spec.get("timeout_seconds", 5.0))
        )
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
