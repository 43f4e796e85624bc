"""What the long2short commands read: models by path or demo name, prompts from a built-in task or a JSONL file,
and a scorer that judges completions as the plugin's rewards do."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k15_plugin.data.builtin import BUILTIN_TASKS
from k15_plugin.data.jsonl import read_objects
from k15_plugin.errors import K15Error


class Long2ShortError(K15Error):
    """A user-facing error: one line, naming the option, file or key at fault."""


# ----------------------------------------------------------------------------------------------------- models
def model_dir(value: str, option: str) -> Path:
    """A saved model's directory: a path, or a shipped demo model's name (``tiny_demo_sum3_long``, ...)."""
    from k15_plugin.data.arithmetic import DEMO_MODELS

    path = DEMO_MODELS.get(value, Path(value))
    if not path.is_dir():
        raise Long2ShortError(
            f"{option} {value}: not a directory (a model saved with save_pretrained, or one of {sorted(DEMO_MODELS)})"
        )
    if not (path / "config.json").is_file():
        raise Long2ShortError(f"{option} {value}: no config.json in {path} (expected a save_pretrained directory)")
    return path


# ----------------------------------------------------------------------------------------------------- JSONL
def read_jsonl(path: str | Path, option: str) -> list[dict]:
    """The objects of a JSONL file; a missing file, a bad line or no rows is one error naming the file and line."""
    return read_objects(path, option, Long2ShortError)


def require_columns(rows: list[dict], path: str | Path, columns: Sequence[str]) -> None:
    """Raise :class:`Long2ShortError` naming the first row of ``path`` (1-based) that lacks one of ``columns``."""
    for number, row in enumerate(rows, 1):
        missing = [c for c in columns if c not in row]
        if missing:
            raise Long2ShortError(
                f"{path}: row {number} has no {', '.join(repr(c) for c in missing)} (columns: {sorted(row)})"
            )


# ----------------------------------------------------------------------------------------------------- tasks


@dataclass
class Prompts:
    """The prompts a ``sample`` or ``eval`` command runs on (:func:`task_prompts`), with where they came from."""

    rows: list[dict]  # prompt, answer (and tests for code)
    source: str  # what they came from, for the provenance files
    builtin: str | None = None  # the built-in task's name
    max_new_tokens: int | None = None  # the task's own budget (built-in tasks)


def task_prompts(
    task: str | None,
    input_path: str | None,
    split: str,
    num_prompts: int | None,
    seed: int = 0,
    need: Sequence[str] = ("prompt", "answer"),
) -> Prompts:
    """The prompts of a built-in task's ``split`` (``train`` or ``heldout``) or of a JSONL file.

    ``num_prompts`` keeps the first N. A built-in held-out split with a ``difficulty`` column (the chain task's k) is
    taken round-robin over the difficulties first, so that the first N cover every difficulty evenly (the chain's
    held-out rows come sorted by k)."""
    if num_prompts is not None and num_prompts < 1:
        raise Long2ShortError(f"--num-prompts must be >= 1, got {num_prompts}")
    if task is not None:
        if task not in BUILTIN_TASKS:
            raise Long2ShortError(f"--task {task}: not one of {list(BUILTIN_TASKS)}")
        builtin = BUILTIN_TASKS[task]
        if builtin.images:
            raise Long2ShortError(f"--task {task}: an image task; k15-long2short reads text prompts only")
        train, heldout = builtin.rows(None, seed, None)
        budget = builtin.max_new_tokens()
        ds = train if split == "train" else heldout
        rows = [{"prompt": p, "answer": a} for p, a in zip(ds["prompt"], ds["answer"], strict=True)]
        if split != "train" and "difficulty" in ds.column_names:
            rows = [rows[i] for i in _round_robin(ds["difficulty"])]
        source = f"task {task} ({split} split, seed {seed})" if split == "train" else f"task {task} (held-out split)"
        out = Prompts(rows, source, task, budget)
    else:
        rows = read_jsonl(input_path, "--input")
        require_columns(rows, input_path, need)
        out = Prompts(rows, str(Path(input_path).resolve()))
    if num_prompts is not None:
        out.rows = out.rows[:num_prompts]
    return out


def _round_robin(levels: Sequence) -> list[int]:
    """Row indices taking one row of each level in turn (levels in sorted order, rows in their order within it)."""
    by_level: dict = {}
    for i, level in enumerate(levels):
        by_level.setdefault(level, []).append(i)
    queues = [by_level[level] for level in sorted(by_level)]
    return [q[j] for j in range(max(map(len, queues), default=0)) for q in queues if j < len(q)]


# ----------------------------------------------------------------------------------------------------- scoring
Score = Callable[[list[str], list[list[int]], list[dict]], list[float]]


def make_scorer(prompts: Prompts, tokenizer, reward: str, extraction: str | None) -> Score:
    """``score(texts, token_ids, rows) -> rewards``: the built-in task's exact checker (on the token ids, EOS
    included), or ``reward`` (task: answer match with ``extraction``, math: math-verify, code: the sandbox over the
    rows' ``tests``) from :mod:`k15_plugin.rewards`."""
    if prompts.builtin is not None and reward == "task":
        from k15_plugin.data.arithmetic import ArithmeticReward

        builtin = BUILTIN_TASKS[prompts.builtin]
        checker = ArithmeticReward(tokenizer, allow_filler=builtin.allow_filler, allow_steps=builtin.allow_steps)
        return lambda texts, ids, rows: [checker.score(i, r["answer"]) for i, r in zip(ids, rows, strict=True)]
    from k15_plugin.rewards.registry import VERIFIERS, scorer

    spec: dict[str, Any] = {"verifier": reward}
    if extraction:
        spec["extraction"] = extraction
    score = scorer(spec)
    label = VERIFIERS[reward].column
    return lambda texts, ids, rows: [float(x) for x in score(list(texts), [r[label] for r in rows])]
