"""The verifiers by name: the one place to add a reward.

A verifier is one :class:`Verifier` entry in :data:`VERIFIERS`, declared with :func:`register_verifier`. It says

* ``column``: the row field it checks a completion against (``answer`` or ``tests``), which is also the label a
  per-sample host passes (OpenRLHF's ``labels``, verl's ``ground_truth``);
* ``spec``: how a composed ``reward`` config node (``conf/reward``; with the ``data`` node for defaults) becomes a
  small JSON-able spec, the form that travels to Ray workers in a generated reward file;
* ``build``: the TRL reward function for a spec, ``f(completions, **columns) -> list[float]``.

Every caller goes through this table: ``k15-train``'s TRL task (:func:`reward_funcs`), the OpenRLHF reward file and
verl's ``compute_score`` (:func:`scorer`, per sample with a label), the curation and long2short commands
(:func:`scorer`), and the config schema (``reward.verifier`` accepts exactly the names registered here).

Adding a verifier ``regex``::

    @register_verifier("regex", column="answer")
    def _regex_spec(reward, data):
        return {"verifier": "regex", "pattern": reward.regex.pattern}

    def _build_regex(spec, task_reward=None):
        return RegexReward(spec["pattern"])  # f(completions, answer=[...], **kwargs) -> list[float]

(with ``build=_build_regex`` passed to the decorator, and a ``reward.regex`` node in ``cli/schema.py``'s ``Reward``
if it has settings).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

Spec = dict[str, Any]
Score = Callable[[list[str], list[Any]], list[float]]


@dataclass(frozen=True)
class Verifier:
    """One verifier: the column it reads, its spec from the Hydra config, and its TRL reward function.

    Args:
        name: the ``reward.verifier`` value.
        column: the row field (and per-sample label) it checks against.
        spec: ``spec(reward, data) -> dict``; ``reward`` is the composed ``reward`` node, ``data`` the ``data`` node.
        build: ``build(spec, task_reward) -> f(completions, **columns)``; ``task_reward`` is the data's own checker,
            which only the ``task`` verifier uses inside ``k15-train``.
        parse_label: turns a per-sample label into the column's value (``code``: a JSON string of tests).
    """

    name: str
    column: str
    spec: Callable[[Any, Any], Spec]
    build: Callable[[Spec, Callable | None], Callable]
    parse_label: Callable[[Any], Any] = lambda label: label


VERIFIERS: dict[str, Verifier] = {}


def register_verifier(
    name: str, *, column: str, build: Callable[[Spec, Callable | None], Callable], parse_label=None
) -> Callable:
    """Decorator: register the decorated ``spec(reward, data)`` function as the verifier ``name``.

    Example:
    ```python
    >>> from k15_plugin.rewards.registry import VERIFIERS
    >>> sorted(VERIFIERS)
    ['code', 'math', 'task']

    ```
    """

    def wrap(spec: Callable[[Any, Any], Spec]) -> Callable[[Any, Any], Spec]:
        if name in VERIFIERS:
            raise ValueError(f"verifier {name!r} is registered twice")
        extra = {} if parse_label is None else {"parse_label": parse_label}
        VERIFIERS[name] = Verifier(name, column, spec, build, **extra)
        return spec

    return wrap


def get_verifier(name: str) -> Verifier:
    """The verifier ``name``; a ValueError lists the registered names."""
    if name not in VERIFIERS:
        raise ValueError(f"verifier must be {_names()}, got {name!r}")
    return VERIFIERS[name]


def _names() -> str:
    names = list(VERIFIERS)
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def plain(value: Any) -> Any:
    """A config value as a plain Python value: the schema's ``str`` enums become their string."""
    return value.value if isinstance(value, Enum) else value


# ------------------------------------------------------------------------------------------------ the verifiers
def _build_task(spec: Spec, task_reward: Callable | None = None) -> Callable:
    if task_reward is not None:  # k15-train: the data's own checker (the demo's exact answer + EOS, ...)
        return task_reward
    from k15_plugin.rewards.answer import AnswerMatchReward

    return AnswerMatchReward(extraction=spec.get("extraction") or "last_number")


@register_verifier("task", column="answer", build=_build_task)
def _task_spec(reward, data) -> Spec:
    """The data's own checker: exact match of the answer found by ``data.answer_extraction``."""
    return {"verifier": "task", "extraction": data.answer_extraction}


def _build_math(spec: Spec, task_reward: Callable | None = None) -> Callable:
    from k15_plugin.rewards import get_math_reward

    return get_math_reward(
        extraction=spec.get("extraction") or "auto", timeout_seconds=float(spec.get("timeout_seconds", 5.0))
    )


@register_verifier("math", column="answer", build=_build_math)
def _math_spec(reward, data) -> Spec:
    """math-verify on the ``answer`` column (``reward.math``)."""
    extraction = plain(reward.math.extraction) or data.answer_extraction
    return {"verifier": "math", "extraction": extraction, "timeout_seconds": reward.math.timeout_seconds}


def sandbox_config(options: Any):
    """The :class:`~k15_plugin.sandbox.SandboxConfig` of a ``reward.code`` node or of a spec's ``sandbox`` dict."""
    from k15_plugin.sandbox import SandboxConfig

    return SandboxConfig(**_sandbox_options(options))


def _sandbox_options(options: Any) -> dict[str, Any]:
    if isinstance(options, dict):  # a spec's sandbox: any SandboxConfig fields
        out = dict(options)
        out["allow_paths"] = tuple(out.get("allow_paths", ()))
        return out
    return {  # a reward.code config node
        "timeout_seconds": options.timeout_seconds,
        "memory_mb": options.memory_mb,
        "concurrency": options.concurrency,
        "isolation": plain(options.isolation),
        "allow_paths": tuple(options.allow_paths),
        "cgroup": plain(options.cgroup),
    }


def _build_code(spec: Spec, task_reward: Callable | None = None) -> Callable:
    from k15_plugin.rewards import get_code_reward

    partial_credit = bool(spec.get("partial_credit", True))
    return get_code_reward(partial_credit=partial_credit, sandbox=sandbox_config(spec.get("sandbox", {})))


def _tests_of(label: Any) -> Any:
    return json.loads(label) if isinstance(label, str) else label


@register_verifier("code", column="tests", build=_build_code, parse_label=_tests_of)
def _code_spec(reward, data) -> Spec:
    """The sandboxed test cases of the ``tests`` column (``reward.code``)."""
    sandbox = _sandbox_options(reward.code)
    sandbox["allow_paths"] = list(sandbox["allow_paths"])  # JSON-able
    return {"verifier": "code", "partial_credit": reward.code.partial_credit, "sandbox": sandbox}


# ------------------------------------------------------------------------------------------------ the callers
def spec_of(reward, data) -> Spec:
    """The JSON-able spec of a composed ``reward`` config node (``data`` gives the answer extraction's default)."""
    return get_verifier(plain(reward.verifier)).spec(reward, data)


_COLUMN_FORMATS = {"tests": "[{'input': str, 'output': str}, ...] per row", "answer": "the reference answer"}


def check_columns(reward, data, columns: list[str]) -> None:
    """Raise ``ValueError`` (one line) when the rows of ``data``, with ``columns``, lack the column that
    ``reward.verifier`` reads: ``k15-train`` calls it before anything loads where the columns are known (the
    built-in tasks), and again when the task is built. The ``task`` verifier uses the data's own checker."""
    name = plain(reward.verifier)
    column = VERIFIERS[name].column
    if name != "task" and column not in columns:
        raise ValueError(
            f"reward.verifier={name} reads a `{column}` column ({_COLUMN_FORMATS.get(column, 'per row')}), but "
            f"data={data.name} has only {columns}"
        )


def reward_funcs(reward, data, columns: list[str], task_reward: Callable) -> list[Callable]:
    """TRL's reward functions for ``reward.verifier`` (``k15-train``); ``task_reward`` is the data's own checker.

    ``reward`` None keeps the data's checker. Raises ValueError naming the key when a value is out of range or the data
    lacks the column the verifier reads.
    """
    if reward is None:
        return [task_reward]
    name = plain(reward.verifier)
    if name not in VERIFIERS:
        raise ValueError(f"reward.verifier={name!r} is not one of {list(VERIFIERS)}")
    verifier = VERIFIERS[name]
    check_columns(reward, data, columns)
    try:
        return [verifier.build(verifier.spec(reward, data), task_reward)]
    except ValueError as err:
        raise ValueError(f"reward.{name}: {err}") from None


def scorer(spec: Spec) -> Score:
    """``score(completions, labels) -> list[float]`` for a spec, one label per completion: what per-sample hosts
    (OpenRLHF's reward file, verl's ``compute_score``) and the offline commands call. ``verifier`` defaults to math.

    Example:
    ```python
    >>> from k15_plugin.rewards.registry import scorer
    >>> score = scorer({"verifier": "task", "extraction": "last_number"})
    >>> score(["so the answer is 12", "13"], ["12", "12"])
    [1.0, 0.0]

    ```
    """
    verifier = get_verifier(spec.get("verifier", "math"))
    reward = verifier.build(spec, None)

    def score(completions: list[str], labels: list[Any]) -> list[float]:
        return reward(completions, **{verifier.column: [verifier.parse_label(label) for label in labels]})

    return score
