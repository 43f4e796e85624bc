"""Datasets for the CLI: the built-in arithmetic task, a Hub dataset by name, or a user's JSONL file.

Every task comes out in one schema: ``prompt`` (a string, or a one-message chat list when ``chat``), ``answer`` (the
bare reference answer), ``difficulty`` when the source has it (the curriculum sampler reads it; higher is harder) and
``tests`` when it has it (test cases for the code verifier).

The reward is chosen by ``reward.verifier`` (:func:`k15_plugin.rewards.registry.reward_funcs`): ``task`` is the
data's own checker (the demo's exact answer + EOS, or ``data.answer_extraction`` exact match), ``math`` is math-verify
and ``code`` runs the ``tests`` in a sandbox. Hub and JSONL tasks are evaluated with the same reward they train on;
the demo task always with its own exact checker, so its accuracy stays comparable across reward configs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, load_dataset

from k15_plugin.data.arithmetic import ArithmeticReward, evaluate_greedy, greedy_kwargs
from k15_plugin.data.builtin import BUILTIN_TASKS, DEMO_SOURCES, task_name, task_options
from k15_plugin.data.jsonl import RowFormat, file_identity, heldout_count, prompt_key, read_rows
from k15_plugin.errors import ConfigError
from k15_plugin.rewards.answer import AnswerMatchReward, extract_answer
from k15_plugin.rewards.registry import VERIFIERS, plain, reward_funcs


@dataclass
class Task:
    """What :func:`load_task` returns: the training and held-out rows, TRL's reward functions, and the evaluator."""

    train: Dataset
    heldout: Dataset
    reward_funcs: list[Callable]
    # evaluate(model, tokenizer, rows) -> {"accuracy": float, "mean_completion_tokens": float}: greedy decoding of
    # `rows` (held-out rows) on the model's device
    evaluate: Callable[[Any, Any, Dataset], dict[str, float]]


def _demo_rows(data, seed: int) -> tuple[Dataset, Dataset]:
    task = BUILTIN_TASKS[task_name(data)]
    return task.rows(data.num_train, seed, data.heldout_size, **task_options(data))


def demo_columns(data, seed: int) -> list[str]:
    """The training columns of the built-in demo task ``data``, from one row built the same way (the pre-run check
    needs only the names, not the task's tens of thousands of rows)."""
    task = BUILTIN_TASKS[task_name(data)]
    return task.rows(1, seed, data.heldout_size, **task_options(data))[0].column_names


def _demo_task(data, tokenizer, seed: int, reward=None) -> Task:
    task = BUILTIN_TASKS[task_name(data)]
    train, heldout = _demo_rows(data, seed)
    budget = task.max_new_tokens(**task_options(data))
    if task.images:  # `tokenizer` is the vision-language model's processor
        from k15_plugin.data.vision import evaluate_vision

        exact = ArithmeticReward(tokenizer.tokenizer)
        return Task(train, heldout, reward_funcs(reward, data, train.column_names, exact), evaluate_vision)

    def evaluate(model, tokenizer, rows):
        return evaluate_greedy(
            model,
            tokenizer,
            rows,
            max_new_tokens=budget,
            allow_filler=task.allow_filler,
            allow_steps=task.allow_steps,
        )

    exact = ArithmeticReward(tokenizer, allow_filler=task.allow_filler, allow_steps=task.allow_steps)
    return Task(train, heldout, reward_funcs(reward, data, train.column_names, exact), evaluate)


def _format_rows(ds: Dataset, data, prompt_column: str, answer_column: str) -> Dataset:
    def convert(row):
        text = data.prompt_template.format(prompt=row[prompt_column])
        reference = str(row[answer_column]) if answer_column in row else ""
        if data.answer_extraction in ("gsm8k", "boxed"):
            reference = extract_answer(reference, data.answer_extraction) or reference
        out = {"prompt": [{"role": "user", "content": text}] if data.chat else text, "answer": reference}
        if "difficulty" in row:
            out["difficulty"] = None if row["difficulty"] is None else float(row["difficulty"])
        return out

    keep = {"prompt", "answer", "difficulty", "tests"}
    return ds.map(convert, remove_columns=[c for c in ds.column_names if c not in keep])


def _jsonl_rows(path: str, key: str, fmt, exclude: set[int], exclude_id) -> Dataset:
    """The rows of a JSONL file as ``k15_plugin.data.jsonl.read_rows`` reads (and checks) them: the same reader as
    the CLI's pre-run check, so the loader accepts exactly what the check accepts. Duplicate prompts, and prompts in
    ``exclude`` (the held-out file's), are dropped. ``difficulty`` is kept only when every row has one."""
    import hashlib

    from datasets import Features, Value
    from datasets.exceptions import DatasetGenerationError

    features = {"prompt": Value("string"), "answer": Value("string"), "difficulty": Value("float64")}
    if fmt.code:
        features["tests"] = [{"input": Value("string"), "output": Value("string")}]
    # read_rows' rules are part of the key (k15-jsonl-1): a new file version, format or exclusion builds a new cache
    identity = repr(("k15-jsonl-1", file_identity(path), fmt, exclude_id))
    try:
        ds = Dataset.from_generator(
            read_rows,
            features=Features(features),
            gen_kwargs={"path": path, "key": key, "fmt": fmt, "exclude": exclude},
            fingerprint=hashlib.sha256(identity.encode()).hexdigest()[:32],
        )
    except DatasetGenerationError as err:  # datasets wraps what the generator raised
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise
    if ds.data.column("difficulty").null_count > 0:
        ds = ds.remove_columns("difficulty")
    return ds


def _loaded_task(data, seed: int, max_new_tokens: int, reward_cfg=None) -> Task:
    code = reward_cfg is not None and VERIFIERS[plain(reward_cfg.verifier)].column == "tests"
    if data.source == "jsonl":
        fmt = RowFormat.of(data, reward_cfg)
        heldout, held_keys, held_id = None, set(), None
        if data.heldout_split is not None:  # a second JSONL file
            heldout = _jsonl_rows(data.heldout_split, "data.heldout_split", fmt, set(), None)
            held_keys, held_id = {prompt_key(p) for p in heldout["prompt"]}, file_identity(data.heldout_split)
        full = _jsonl_rows(data.path, "data.path", fmt, held_keys, held_id)
        prompt_column, answer_column = "prompt", "answer"  # read_rows' names
    else:
        full = load_dataset(data.path, data.config_name, split=data.split)
        heldout = load_dataset(data.path, data.config_name, split=data.heldout_split) if data.heldout_split else None
        prompt_column, answer_column = data.prompt_column, data.answer_column
        keys = (
            {"data.prompt_column": prompt_column}
            if code
            else {"data.prompt_column": prompt_column, "data.answer_column": answer_column}
        )
        for key, column in keys.items():  # code: the `tests` column is checked by reward_funcs
            if column not in full.column_names:
                raise ValueError(
                    f"{key}={column!r} is not a column of data.path={data.path} (split {data.split}); "
                    f"its columns: {full.column_names}"
                )
    if heldout is None:
        parts = full.train_test_split(test_size=heldout_count(len(full), data.heldout_size), seed=seed)
        full, heldout = parts["train"], parts["test"]
    elif len(heldout) > data.heldout_size:
        heldout = heldout.shuffle(seed=seed).select(range(data.heldout_size))
    train = _format_rows(full, data, prompt_column, answer_column)
    if data.num_train is not None:
        train = train.shuffle(seed=seed).select(range(min(data.num_train, len(train))))
    heldout = _format_rows(heldout, data, prompt_column, answer_column)
    funcs = reward_funcs(reward_cfg, data, train.column_names, AnswerMatchReward(extraction=data.answer_extraction))

    def evaluate(model, tokenizer, rows):
        return evaluate_with_reward(model, tokenizer, rows, funcs[0], max_new_tokens)

    return Task(train, heldout, funcs, evaluate)


def load_task(data, tokenizer, seed: int, max_new_tokens: int, reward=None) -> Task:
    """The task named by a composed ``data`` config (see ``conf/data``), scored as ``reward.verifier`` says.

    ``reward`` is the composed ``reward`` config; None keeps the data's own checker (``verifier=task``).
    """
    if data.source in DEMO_SOURCES:
        return _demo_task(data, tokenizer, seed, reward)
    return _loaded_task(data, seed, max_new_tokens, reward)


def task_rows(data, seed: int, max_new_tokens: int, reward=None) -> tuple[Dataset, Dataset]:
    """The train and held-out rows of :func:`load_task` (columns prompt, answer and, where given, difficulty and
    tests), without a tokenizer: for hosts that read the rows from files (OpenRLHF)."""
    if data.source in DEMO_SOURCES:
        return _demo_rows(data, seed)
    task = _loaded_task(data, seed, max_new_tokens, reward)
    return task.train, task.heldout


@torch.no_grad()
def evaluate_with_reward(model, tokenizer, heldout: Dataset, reward, max_new_tokens: int, batch_size: int = 32):
    """Greedy decoding of every held-out prompt, scored by ``reward`` (for Hub and JSONL tasks)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, tokens = 0.0, 0
    try:
        for start in range(0, len(heldout), batch_size):
            rows = heldout.select(range(start, min(start + batch_size, len(heldout))))
            prompts = list(rows["prompt"])
            if isinstance(prompts[0], list):
                texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
            else:
                texts = prompts
            batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left").to(device)
            out = model.generate(**batch, **greedy_kwargs(tokenizer, max_new_tokens))
            completion_ids = out[:, batch["input_ids"].shape[1] :]
            lengths = (completion_ids != tokenizer.pad_token_id).sum(dim=1)
            completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            columns = {c: list(rows[c]) for c in rows.column_names if c != "prompt"}  # answer, tests, ...
            correct += sum(reward(prompts=prompts, completions=completions, **columns))
            tokens += int(lengths.sum())
    finally:
        model.train(was_training)
    n = max(len(heldout), 1)
    return {"accuracy": correct / n, "mean_completion_tokens": tokens / n}
