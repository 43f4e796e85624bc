"""A verifiable code reward: run the completion's program on the problem's test cases (paper sections 2.3 and 2.6).

k1.5 rewards coding problems by executing the generated program against test cases in a sandbox; problems without
tests get tests generated and validated first (section 2.3, "test case generation"). This module is the execution
half: the last fenced code block of the completion (```` ```python ```` or a bare fence; the whole completion when it
has no fence) runs once per test case in :class:`~k15_plugin.sandbox.Sandbox` with the test's ``input`` on
stdin, and its stdout is compared with the test's ``output`` (line by line, trailing whitespace and trailing blank
lines ignored, ``\\r\\n`` = ``\\n``). A run passes only if the program exits with status 0 within the limits.

The reward is the fraction of tests passed (``partial_credit=True``) or 1.0 only when all pass (then the first
failure stops the remaining tests of that program). Expected outputs never leave the trainer process: the sandbox
gets the program and the inputs only. A program that cannot be found, a malformed test list, a crash, a timeout or a
sandbox failure scores 0 for that test; only a missing ``tests`` column (a wiring mistake) or a sandbox that cannot
give the required isolation (``isolation="allowlist"``, the default) raises.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from k15_plugin.rewards.columns import column_values
from k15_plugin.rewards.math import completion_text
from k15_plugin.sandbox import RunResult, Sandbox, SandboxConfig

LANGUAGES = ("python",)
# Fence info strings taken as Python; any other language's block is skipped.
_PYTHON_TAGS = ("", "python", "python3", "py", "py3")
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.DOTALL | re.MULTILINE)


def extract_program(completion: Any) -> str | None:
    """The program in a completion: its last Python (or untagged) fenced block, else the whole text if unfenced.

    An unclosed last fence (the model ran out of tokens) counts as a block to the end of the text. None when the
    text is empty or every fenced block is in another language.
    """
    text = completion_text(completion)
    if not text.strip():
        return None
    blocks = _FENCE.findall(text)
    if not blocks:
        return None if "```" in text else text
    for tag, body in reversed(blocks):
        if tag.lower() in _PYTHON_TAGS:
            return body
    return None


def normalize_output(text: str) -> str:
    """Output as compared: ``\\r\\n`` -> ``\\n``, trailing whitespace of every line and trailing blank lines removed."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).rstrip()


def parse_tests(tests: Any) -> list[tuple[str, str]]:
    """``[(stdin, expected stdout), ...]`` from a ``tests`` cell.

    Accepted: a list of ``{"input": str, "output": str}``, the same as a JSON string, or APPS/TACO's
    ``{"inputs": [...], "outputs": [...]}``. Raises ValueError on anything else.
    """
    if isinstance(tests, str):
        tests = json.loads(tests)
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"], strict=True)]
    if not isinstance(tests, (list, tuple)) or not tests:
        raise ValueError(f"tests must be a non-empty list of {{'input', 'output'}} records, got {type(tests).__name__}")
    pairs = []
    for case in tests:
        if not isinstance(case, dict) or not isinstance(case.get("input"), str) or "output" not in case:
            raise ValueError(f"each test must be {{'input': str, 'output': str}}, got {case!r:.80}")
        output = case["output"]
        pairs.append((case["input"], output if isinstance(output, str) else str(output)))
    return pairs


def passed(result: RunResult, expected: str) -> bool:
    """A run passes when it exited with status 0 within the limits and printed the expected output."""
    return result.ok and normalize_output(result.stdout) == normalize_output(expected)


class CodeReward:
    """TRL reward function: the share of a problem's test cases the completion's program passes, in a sandbox.

    Args:
        partial_credit: True: fraction of tests passed; False: 1.0 only if every test passes (the first failure
            stops that program's remaining tests).
        language: ``python`` (the only one for now).
        tests_column: the dataset column with the test cases (see :func:`parse_tests`).
        max_tests: run at most this many tests per problem (the first ones); None: all.
        sandbox: a :class:`SandboxConfig`; or give its fields as keyword arguments (``timeout_seconds``,
            ``memory_mb``, ``concurrency``, ``isolation``, ``allow_paths``, ...).

    Picklable (only options travel; each process probes its own sandbox on first use). Logs ``code/timeouts``,
    ``code/sandbox_errors`` and ``code/pass_rate`` through TRL's ``log_metric``. Called by TRL as
    ``reward(completions, tests=[...], **other_columns)``: raises TypeError when the tests column is missing and
    ValueError when the lengths differ. A batch with no row holding both a program and valid tests starts no sandbox.

    Example (the call that runs programs is skipped by doctest: it starts the sandbox):
    ```python
    >>> from k15_plugin.rewards.code import CodeReward
    >>> reward = CodeReward(partial_credit=False, timeout_seconds=2.0)
    >>> tests = [{"input": "2 3\\n", "output": "5\\n"}, {"input": "10 -4\\n", "output": "6\\n"}]
    >>> fence = "`" * 3
    >>> solution = fence + "python\\na, b = map(int, input().split())\\nprint(a + b)\\n" + fence
    >>> reward([solution, "print(5)"], tests=[tests, tests])  # doctest: +SKIP
    [1.0, 0.0]
    >>> reward([fence + "js\\nconsole.log(5)\\n" + fence], tests=[tests])  # a JavaScript block: no program
    [0.0]
    >>> CodeReward(language="cpp")
    Traceback (most recent call last):
    ...
    ValueError: language must be one of ['python'], got 'cpp'

    ```
    """

    def __init__(
        self,
        partial_credit: bool = True,
        language: str = "python",
        tests_column: str = "tests",
        max_tests: int | None = None,
        sandbox: SandboxConfig | None = None,
        **sandbox_options: Any,
    ):
        if language not in LANGUAGES:
            raise ValueError(f"language must be one of {list(LANGUAGES)}, got {language!r}")
        if max_tests is not None and max_tests < 1:
            raise ValueError(f"max_tests must be None or >= 1, got {max_tests!r}")
        if sandbox is not None and sandbox_options:
            raise TypeError("pass either sandbox=SandboxConfig(...) or its fields as keyword arguments, not both")
        self.partial_credit = bool(partial_credit)
        self.language = language
        self.tests_column = tests_column
        self.max_tests = max_tests
        self.sandbox_config = sandbox if sandbox is not None else SandboxConfig(**sandbox_options)
        self.__name__ = "code_tests"

    def __repr__(self) -> str:
        return f"CodeReward(partial_credit={self.partial_credit}, sandbox={self.sandbox_config})"

    def __call__(self, completions: Sequence[Any], tests: Sequence[Any] | None = None, **kwargs: Any) -> list[float]:
        what = "a list of {'input', 'output'} test cases per row"
        cells = column_values("CodeReward", self.tests_column, "tests", tests, kwargs, completions, what)
        rewards = [0.0] * len(completions)
        jobs, owners, expected = [], [], []
        for row, (completion, cell) in enumerate(zip(completions, cells, strict=True)):
            program = extract_program(completion)
            try:
                cases = parse_tests(cell)
            except (ValueError, TypeError):
                continue
            if self.max_tests is not None:
                cases = cases[: self.max_tests]
            if program is None:
                continue
            jobs.append((program, [stdin for stdin, _ in cases]))
            expected.append([out for _, out in cases])
            owners.append(row)
        if not jobs:
            return rewards

        def keep_going(job: int, i: int, result: RunResult) -> bool:
            return self.partial_credit or passed(result, expected[job][i])

        results = Sandbox(self.sandbox_config).run_many(jobs, keep_going)
        timeouts = errors = 0
        for job, (row, runs) in enumerate(zip(owners, results, strict=True)):
            wins = sum(passed(r, want) for r, want in zip(runs, expected[job], strict=False))
            total = len(expected[job])
            rewards[row] = wins / total if self.partial_credit else float(wins == total)
            timeouts += sum(r.timed_out for r in runs)
            errors += sum(r.error is not None for r in runs)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            try:
                log_metric("code/timeouts", float(timeouts))
                log_metric("code/sandbox_errors", float(errors))
                log_metric("code/pass_rate", sum(rewards) / len(rewards))
            except Exception:
                pass
        return rewards
