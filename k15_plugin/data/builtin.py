"""The built-in tasks by name: one :class:`BuiltinTask` entry each, read by ``k15-train`` and ``k15-long2short``.

A built-in task is rows made in code (``prompt``, ``answer`` and, where the task has one, ``difficulty``), the
exact checker's options (:class:`~k15_plugin.data.arithmetic.ArithmeticReward`: filler before the answer, worked
steps before the last ``=``) and the generation budget. ``k15-train`` finds the entry from its ``data`` config
(:func:`task_name`: ``data.source``, ``data.terms``, ``data.filler_max``); ``k15-long2short --task`` by name.

A new built-in task is a module in ``k15_plugin/data`` with its row builder, one entry in :data:`BUILTIN_TASKS` and a
``conf/data/<name>.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from datasets import Dataset


def arithmetic_difficulty(prompt: str) -> int:
    """Carries needed by ``a+b=`` (0, 1 or 2): the demo task's difficulty label, for the curriculum sampler."""
    a, b = (int(x) for x in prompt.rstrip("=").split("+"))
    ones_carry = (a % 10 + b % 10) >= 10
    tens_carry = (a // 10 + b // 10 + int(ones_carry)) >= 10
    return int(ones_carry) + int(tens_carry)


@dataclass(frozen=True)
class BuiltinTask:
    """One built-in task.

    Args:
        rows: ``rows(num_train, seed, heldout_size, **options) -> (train, heldout)``; ``None`` arguments take the
            task's defaults; ``options`` are the task's own (``filler_max``, ``terms_min``, ``terms_max``).
        allow_filler, allow_steps: the exact checker's options.
        max_new_tokens: ``max_new_tokens(**options)``, the generation budget: the longest answer the checker
            accepts, EOS included.
        difficulty: whether the rows carry a ``difficulty`` column.
        images: whether the rows are vision-language ones (a conversational ``prompt`` and an ``image`` column, for
            TRL's vision-language path): ``k15-train`` then loads the model with ``AutoProcessor`` and
            ``AutoModelForImageTextToText`` (TRL host only); ``k15-long2short`` reads text prompts only.
    """

    rows: Callable[..., tuple[Dataset, Dataset]]
    allow_filler: bool = False
    allow_steps: bool = False
    max_new_tokens: Callable[..., int] = lambda **options: 4
    difficulty: bool = False
    images: bool = False


def _arithmetic_rows(num_train, seed, heldout_size, filler_max: int = 0, **_) -> tuple[Dataset, Dataset]:
    from k15_plugin.data.arithmetic import make_datasets

    kwargs = {} if heldout_size is None else {"heldout_size": heldout_size}
    train, heldout = make_datasets(num_train=num_train, seed=seed, filler_max=filler_max, **kwargs)
    return train.add_column("difficulty", [arithmetic_difficulty(p) for p in train["prompt"]]), heldout


def _sum3_rows(num_train, seed, heldout_size, **_) -> tuple[Dataset, Dataset]:
    from k15_plugin.data.sum3 import make_sum3_datasets

    kwargs = {} if heldout_size is None else {"heldout_size": heldout_size}
    return make_sum3_datasets(num_train=num_train, seed=seed, **kwargs)


def _chain_rows(num_train, seed, heldout_size, terms_min: int = 2, terms_max: int = 8, **_):
    from k15_plugin.data.chain import make_chain_datasets

    kwargs = {} if heldout_size is None else {"heldout_size": heldout_size}
    return make_chain_datasets(num_train=num_train, seed=seed, terms_min=terms_min, terms_max=terms_max, **kwargs)


def _vision_rows(num_train, seed, heldout_size, **_):
    from k15_plugin.data.vision import make_vision_datasets

    kwargs = {} if heldout_size is None else {"heldout_size": heldout_size}
    return make_vision_datasets(num_train=num_train, seed=seed, **kwargs)


def _vision_budget(**_) -> int:
    from k15_plugin.data.vision import MAX_NEW_TOKENS

    return MAX_NEW_TOKENS


def _sum3_budget(**_) -> int:
    from k15_plugin.data.sum3 import MAX_NEW_TOKENS

    return MAX_NEW_TOKENS


def _chain_budget(terms_max: int = 8, **_) -> int:
    from k15_plugin.data.chain import max_new_tokens

    return max_new_tokens(terms_max)


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "demo_arithmetic": BuiltinTask(_arithmetic_rows, difficulty=True),
    "demo_arithmetic_filler": BuiltinTask(
        lambda num_train, seed, heldout_size, **options: _arithmetic_rows(
            num_train, seed, heldout_size, **{"filler_max": 6, **options}
        ),
        allow_filler=True,
        max_new_tokens=lambda **options: 10,  # up to 6 filler tokens, 3 digits and EOS
        difficulty=True,
    ),
    "demo_sum3": BuiltinTask(_sum3_rows, allow_steps=True, max_new_tokens=_sum3_budget),
    "demo_chain": BuiltinTask(_chain_rows, allow_steps=True, max_new_tokens=_chain_budget, difficulty=True),
    "demo_vision": BuiltinTask(_vision_rows, max_new_tokens=_vision_budget, difficulty=True, images=True),
}
DEMO_SOURCES = ("demo_arithmetic", "demo_chain", "demo_vision")  # the data.source values of the built-in tasks


def task_name(data) -> str:
    """The built-in task a ``k15-train`` ``data`` config names (``data.source`` one of :data:`DEMO_SOURCES`)."""
    if data.source in ("demo_chain", "demo_vision"):
        return data.source
    if data.terms == 3:
        return "demo_sum3"
    return "demo_arithmetic_filler" if data.filler_max > 0 else "demo_arithmetic"


def image_task(data) -> bool:
    """Whether a ``k15-train`` ``data`` config names a vision-language task (rows with an ``image`` column)."""
    return data.source in DEMO_SOURCES and BUILTIN_TASKS[task_name(data)].images


def task_options(data) -> dict[str, Any]:
    """The task's own options in a ``data`` config (``filler_max``; ``terms_min``/``terms_max`` for the chain)."""
    if data.source == "demo_chain":
        return {"terms_min": data.terms_min, "terms_max": data.terms_max}
    if data.source == "demo_vision":
        return {}
    return {"filler_max": data.filler_max}
