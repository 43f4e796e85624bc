"""The per-sample scorer (rewards.registry.scorer) that OpenRLHF's reward file and verl's compute_score share."""

import json

import pytest

from k15_plugin.rewards.registry import scorer


def test_task_and_math_verifiers():
    task = scorer({"verifier": "task", "extraction": "last_number"})
    assert task(["12+30= 42", "41"], ["42", "42"]) == [1.0, 0.0]
    math = scorer({"verifier": "math", "extraction": "boxed"})
    assert math(["\\boxed{\\frac{1}{2}}", "\\boxed{2}"], ["0.5", "0.5"]) == [1.0, 0.0]


def test_code_labels_may_be_json_strings():
    from k15_plugin.rewards import Sandbox, SandboxConfig, SandboxUnavailableError

    try:
        Sandbox(SandboxConfig(isolation="none"))
    except SandboxUnavailableError as err:  # pragma: no cover - machines without a usable interpreter
        pytest.skip(str(err))
    code = scorer({"verifier": "code", "partial_credit": True, "sandbox": {"isolation": "none", "allow_paths": []}})
    tests = [{"input": "2\n", "output": "4\n"}, {"input": "3\n", "output": "6\n"}]
    program = "```python\nprint(int(input()) * 2)\n```"
    assert code([program, program], [tests, json.dumps(tests)]) == [1.0, 1.0]


def test_unknown_verifier():
    with pytest.raises(ValueError, match="verifier must be task, math or code"):
        scorer({"verifier": "vibes"})
