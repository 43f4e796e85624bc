"""Datasets for the CLI: the built-in arithmetic task, a Hub dataset by name, or a user's JSONL file.

Every task comes out in one schema: ``prompt`` (a string, or a one-message chat list when ``chat``), ``answer`` (the
bare reference answer), and ``difficulty`` when the source has it (the curriculum sampler reads it; higher is harder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, load_dataset

from k15_plugin.data.arithmetic import ArithmeticReward, evaluate_greedy, make_datasets
from k15_plugin.rewards.answer import AnswerMatchReward, extract_answer


@dataclass
class Task:
    train: Dataset
    heldout: Dataset
    reward_funcs: list[Callable]
    # evaluate(model, tokenizer, limit) -> {"accuracy": float, "mean_completion_tokens": float}, greedy decoding
    evaluate: Callable[[Any, Any, int | None], dict[str, float]]


def arithmetic_difficulty(prompt: str) -> int:
    """Carries needed by ``a+b=`` (0, 1 or 2): the demo task's difficulty label, for the curriculum sampler."""
    a, b = (int(x) for x in prompt.rstrip("=").split("+"))
    ones_carry = (a % 10 + b % 10) >= 10
    tens_carry = (a // 10 + b // 10 + int(ones_carry)) >= 10
    return int(ones_carry) + int(tens_carry)


def _demo_task(data, tokenizer, seed: int) -> Task:
    train, heldout = make_datasets(num_train=data.num_train, seed=seed, heldout_size=data.heldout_size,
                                   filler_max=data.filler_max)  # fmt: skip
    train = train.add_column("difficulty", [arithmetic_difficulty(p) for p in train["prompt"]])
    allow_filler = data.filler_max > 0

    def evaluate(model, tokenizer, limit=None):
        subset = heldout if limit is None or limit >= len(heldout) else heldout.select(range(limit))
        return evaluate_greedy(model, tokenizer, subset, allow_filler=allow_filler)

    return Task(train, heldout, [ArithmeticReward(tokenizer, allow_filler=allow_filler)], evaluate)


def _format_rows(ds: Dataset, data) -> Dataset:
    def convert(row):
        text = data.prompt_template.format(prompt=row[data.prompt_column])
        reference = str(row[data.answer_column])
        if data.answer_extraction in ("gsm8k", "boxed"):
            reference = extract_answer(reference, data.answer_extraction) or reference
        out = {"prompt": [{"role": "user", "content": text}] if data.chat else text, "answer": reference}
        if "difficulty" in row:
            out["difficulty"] = float(row["difficulty"])
        return out

    keep = {"prompt", "answer", "difficulty"}
    return ds.map(convert, remove_columns=[c for c in ds.column_names if c not in keep])


def _loaded_task(data, seed: int, max_new_tokens: int) -> Task:
    if data.source == "jsonl":
        full = load_dataset("json", data_files=data.path, split="train")
        heldout = None
    else:
        full = load_dataset(data.path, data.config_name, split=data.split)
        heldout = load_dataset(data.path, data.config_name, split=data.heldout_split) if data.heldout_split else None
    for column in (data.prompt_column, data.answer_column):
        if column not in full.column_names:
            raise ValueError(f"data: column {column!r} not in the dataset (columns: {full.column_names})")
    if heldout is None:
        parts = full.train_test_split(test_size=min(data.heldout_size, len(full) // 5 or 1), seed=seed)
        full, heldout = parts["train"], parts["test"]
    elif len(heldout) > data.heldout_size:
        heldout = heldout.shuffle(seed=seed).select(range(data.heldout_size))
    train = _format_rows(full, data)
    if data.num_train is not None:
        train = train.shuffle(seed=seed).select(range(min(data.num_train, len(train))))
    heldout = _format_rows(heldout, data)
    reward = AnswerMatchReward(extraction=data.answer_extraction)

    def evaluate(model, tokenizer, limit=None):
        subset = heldout if limit is None or limit >= len(heldout) else heldout.select(range(limit))
        return evaluate_with_reward(model, tokenizer, subset, reward, max_new_tokens)

    return Task(train, heldout, [reward], evaluate)


def load_task(data, tokenizer, seed: int, max_new_tokens: int) -> Task:
    """The task named by a composed ``data`` config (see ``conf/data``)."""
    if data.source == "demo_arithmetic":
        return _demo_task(data, tokenizer, seed)
    return _loaded_task(data, seed, max_new_tokens)


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
            out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            completion_ids = out[:, batch["input_ids"].shape[1] :]
            lengths = (completion_ids != tokenizer.pad_token_id).sum(dim=1)
            completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            correct += sum(reward(completions=completions, answer=list(rows["answer"])))
            tokens += int(lengths.sum())
    finally:
        model.train(was_training)
    n = max(len(heldout), 1)
    return {"accuracy": correct / n, "mean_completion_tokens": tokens / n}
