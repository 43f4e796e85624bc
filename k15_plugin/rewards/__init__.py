"""Verifiable rewards (paper section 2.3): math answers checked by math-verify, code run in a sandbox.

Each factory returns a picklable callable class instance with a ``__name__`` (TRL logs rewards by it), called by TRL
as ``f(prompts=, completions=, completion_ids=, **dataset_columns, trainer_state=, log_metric=, ...)``:

    get_math_reward(extraction="auto", timeout_seconds=5.0)          # reads the `answer` column
    get_code_reward(partial_credit=True, timeout_seconds=5.0, ...)   # reads the `tests` column

``k15_plugin.rewards.answer.AnswerMatchReward`` is the dependency-free exact-match checker the CLI's ``task``
verifier uses. The code sandbox itself is :mod:`k15_plugin.sandbox`; its public names are re-exported here. Every
caller picks a verifier by name through :mod:`k15_plugin.rewards.registry` (also the per-sample scorers of verl and
OpenRLHF).
"""

from __future__ import annotations

from typing import Any

from k15_plugin.rewards.code import CodeReward
from k15_plugin.rewards.math import MathReward
from k15_plugin.sandbox import RunResult, Sandbox, SandboxConfig, SandboxUnavailableError

__all__ = [
    "CodeReward",
    "MathReward",
    "RunResult",
    "Sandbox",
    "SandboxConfig",
    "SandboxUnavailableError",
    "get_code_reward",
    "get_math_reward",
]


def get_math_reward(**options: Any) -> MathReward:
    """A :class:`MathReward`: 1.0 when the completion's final answer equals the ``answer`` column (math-verify).

    Options: ``extraction`` (``auto``, ``boxed``, ``gsm8k``, ``last_number``), ``timeout_seconds`` (per sample),
    ``timeout_backend`` (``auto``, ``process``), ``answer_column``.

    Example:
    ```python
    >>> from k15_plugin.rewards import get_math_reward
    >>> reward = get_math_reward(extraction="auto", timeout_seconds=5.0)
    >>> reward([r"so $x = \\boxed{\\frac{1}{2}}$", "I think it is 0.6"], answer=["0.5", "0.5"])
    [1.0, 0.0]

    ```
    """
    return MathReward(**options)


def get_code_reward(**options: Any) -> CodeReward:
    """A :class:`CodeReward`: share of the ``tests`` column's cases the completion's program passes, sandboxed.

    Options: ``partial_credit``, ``language``, ``tests_column``, ``max_tests``, and the :class:`SandboxConfig` fields
    (``timeout_seconds``, ``memory_mb``, ``concurrency``, ``isolation``, ``allow_paths``, ``max_processes``, ...).

    Example (the first call runs the programs in the sandbox, so doctest skips it; the second starts none, as no row
    has both a program and valid tests):
    ```python
    >>> from k15_plugin.rewards import get_code_reward
    >>> reward = get_code_reward(partial_credit=True, timeout_seconds=2.0)
    >>> tests = [{"input": "2 3\\n", "output": "5\\n"}, {"input": "10 -4\\n", "output": "6\\n"}]
    >>> reward(["a, b = map(int, input().split())\\nprint(a + b)", "print(5)"], tests=[tests, tests])  # doctest: +SKIP
    [1.0, 0.5]
    >>> reward(["", "print(5)"], tests=[tests, "not a test list"])
    [0.0, 0.0]

    ```
    """
    return CodeReward(**options)
