"""``compute_score`` for verl's ``reward.custom_reward_function`` over :mod:`k15_plugin.rewards`::

    reward.custom_reward_function.path=pkg://k15_plugin.verl.rewards
    +reward.custom_reward_function.reward_kwargs.verifier=math        # or code, task
    +reward.custom_reward_function.reward_kwargs.extraction=boxed     # math/task: how the answer is found

verl calls it per sample with the decoded response (``solution_str``) and the row's ``reward_model.ground_truth``
(for ``code``: the test list, or that list as a JSON string); the score is 1.0 / 0.0 (``code``: the share of tests
passed, with ``partial_credit``). The same verifiers as ``k15-train reward=math|code`` and OpenRLHF's reward file.
"""

from __future__ import annotations

import json
from typing import Any

from k15_plugin.rewards.registry import scorer

_scorers: dict[str, Any] = {}  # one per spec: math-verify's and the sandbox's set-up is paid once per process


def compute_score(
    data_source, solution_str: str, ground_truth, extra_info=None, *, verifier: str = "math", **spec
) -> float:
    """verl's reward signature; ``verifier`` and the other keyword arguments come from ``reward_kwargs``."""
    key = json.dumps({"verifier": verifier, **spec}, sort_keys=True, default=str)
    if key not in _scorers:
        _scorers[key] = scorer({"verifier": verifier, **spec})
    return float(_scorers[key]([solution_str], [ground_truth])[0])
