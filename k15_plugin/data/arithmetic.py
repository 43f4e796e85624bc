"""Built-in demo task: two-digit addition with a verifiable reward, a tiny Llama, and a supervised warm start.

The task is small enough to run RL on one CPU thread in a couple of minutes while still showing a clear learning
curve: the prompt is ``"a+b="`` with ``a, b`` uniform in 0..99 and the answer is the decimal sum followed by EOS.
Only 10,000 distinct pairs exist, so a fixed held-out set of 500 pairs is excluded from training and scored with
greedy decoding.

Pieces:

* :func:`build_tokenizer` -- a 16-token character-level tokenizer built in code (no download). ``tokenizer("12+34=")``
  gives ``[bos, 1, 2, +, 3, 4, =]``, which is exactly how TRL's ``GRPOTrainer`` tokenizes string prompts
  (``processing_class(text=prompts)`` with the default ``add_special_tokens=True``).
* :func:`build_model` / :func:`tiny_test_model` -- ``LlamaForCausalLM`` built from a config.
* :func:`make_datasets` -- ``(train, heldout)`` ``datasets.Dataset`` s with ``prompt`` and ``answer`` columns.
* :class:`ArithmeticReward` -- a picklable TRL reward function (1.0 iff the completion is the answer then EOS).
* :func:`supervised_warm_start` -- teacher forcing until the held-out greedy accuracy crosses a threshold, so that RL
  starts from a policy that is right sometimes (GRPO needs a non-zero success rate to get any signal).
* :func:`evaluate_greedy` -- batched greedy decoding on the held-out set.
* :func:`sample_completion_lengths` -- length statistics of sampled (temperature 1) completions.
* :func:`load_demo_checkpoint` -- the shipped warm-started checkpoints (built by
  ``python -m k15_plugin.data.make_demo_checkpoint``).

The optional *filler* variant (``filler_max > 0``) puts 0..filler_max random ``.`` tokens before the answer in the
warm-start data, so the policy emits answers of varying length; this gives the length penalty something to act on.

The *long-tailed* variant (``filler_dist="longtail"``, shipped as :data:`DEMO_LONGTAIL_CHECKPOINT_DIR`) draws the
filler count from a mixture instead: none with probability 0.85, 40..56 with probability 0.15. Sampled completions
are then mostly 2-4 tokens long with a minority of up to 60 tokens (56 filler + 3 digits + EOS), the shape that
partial rollouts (cutting long generations into segments) are for. Its model has ``max_position_embeddings=128``
(prompt up to 7 tokens + 64 new tokens) and its ``generation_config.max_new_tokens`` is 64.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

__all__ = [
    "DEMO_CHECKPOINT_DIR",
    "DEMO_FILLER_CHECKPOINT_DIR",
    "DEMO_LONGTAIL_CHECKPOINT_DIR",
    "DEMO_MODELS",
    "FILLER",
    "FILLER_DISTS",
    "HELDOUT_SEED",
    "MAX_OPERAND",
    "ArithmeticReward",
    "build_model",
    "build_tokenizer",
    "evaluate_greedy",
    "greedy_kwargs",
    "load_demo_checkpoint",
    "make_datasets",
    "read_warm_start_info",
    "sample_completion_lengths",
    "sample_filler_counts",
    "supervised_warm_start",
    "tiny_test_model",
]

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
FILLER = "."
MAX_OPERAND = 99
# The held-out pairs depend on this constant only, never on the training seed, so every run (and the accuracy
# recorded next to the shipped checkpoint) is measured on the same 500 pairs.
HELDOUT_SEED = 1234
DEFAULT_HELDOUT_SIZE = 500

# Special tokens first so pad=0, bos=1, eos=2; then digits 3..12 and the three symbols: 16 tokens in all.
VOCAB: dict[str, int] = {
    PAD: 0,
    BOS: 1,
    EOS: 2,
    **{str(d): 3 + d for d in range(10)},
    "+": 13,
    "=": 14,
    FILLER: 15,
}
# Longest completion without filler: three digits ("198") plus EOS.
_MAX_ANSWER_TOKENS = len(str(2 * MAX_OPERAND)) + 1

DEMO_CHECKPOINT_DIR = Path(__file__).resolve().parent / "demo_checkpoint"
DEMO_FILLER_CHECKPOINT_DIR = Path(__file__).resolve().parent / "demo_checkpoint_filler"
DEMO_LONGTAIL_CHECKPOINT_DIR = Path(__file__).resolve().parent / "demo_checkpoint_longtail"
WARM_START_FILE = "warm_start.json"
# The shipped checkpoints by model name (model.name in k15-train, --model in k15-curate / k15-long2short).
DEMO_MODELS = {
    "tiny_demo": DEMO_CHECKPOINT_DIR,
    "tiny_demo_filler": DEMO_FILLER_CHECKPOINT_DIR,
    "tiny_demo_sum3_long": Path(__file__).resolve().parent / "demo_checkpoint_sum3_long",
    "tiny_demo_sum3_short": Path(__file__).resolve().parent / "demo_checkpoint_sum3_short",
}

# Filler-count distributions of the warm start: "uniform" is 0..filler_max, "longtail" the mixture below.
FILLER_DISTS = ("uniform", "longtail")
# The long-tailed mixture: no filler for most samples and a long filler prefix (40..56 tokens) for LONGTAIL_P_LONG of
# them, so a minority of completions is long (up to 56 + 3 digits + EOS = 60 tokens) -- a workload for partial
# rollouts. Both ranges are inclusive; the gap between them keeps "long" unambiguous. The short component is a single
# value so that the most likely first token is the answer's: greedy decoding then answers directly (and greedy
# held-out accuracy measures the arithmetic), while sampling enters the long mode about once in seven. (With a
# short component of 0..3, greedy decoding took a "." at every step up to the long mode and, unable to count to
# 40..56 exactly, ran out of tokens: 0-1% greedy accuracy after 120 fine-tuning steps.)
LONGTAIL_P_LONG = 0.15
LONGTAIL_SHORT = (0, 0)
LONGTAIL_LONG = (40, 56)
# The long-tailed model's position range and generation budget: prompt (at most 7 tokens with BOS) + 64 new tokens
# fits in 128 positions, and 64 new tokens hold the longest warm-start completion (60) with a little room.
LONGTAIL_MAX_POSITION_EMBEDDINGS = 128
LONGTAIL_MAX_NEW_TOKENS = 64


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over the 16-token vocabulary, built in code.

    Every character is its own token (a ``Split`` pre-tokenizer on any single character feeding a ``WordLevel``
    model). The post-processor prepends BOS, so ``tokenizer("12+34=")`` is ``[bos, 1, 2, +, 3, 4, =]`` -- the form
    the model was warm-started on and the form TRL produces. Padding is on the left, as batched generation needs.
    Characters outside the vocabulary raise (there is deliberately no unknown token: the task never produces one).
    """
    backend = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, VOCAB[BOS])]
    )
    # Fuse joins the decoded tokens without the spaces a WordLevel model would otherwise put between them.
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        truncation_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )


def _llama(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    seed: int,
    max_position_embeddings: int = 64,
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # Seed only the initialisation and restore the global RNG afterwards, so building a model has no side effect on
    # whatever sampling the caller does next.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=_MAX_ANSWER_TOKENS,
        do_sample=False,
    )
    return model


def build_model(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 512,
    seed: int = 0,
    max_position_embeddings: int = 64,
) -> LlamaForCausalLM:
    """The demo policy: a 2-layer Llama with tied embeddings (~527k parameters at the defaults).

    ``max_position_embeddings`` bounds prompt + completion length (64 by default; the long-tailed variant uses 128).
    With RoPE it adds no parameters, so the initialisation for a given ``seed`` does not depend on it.
    """
    return _llama(tokenizer, hidden_size, num_layers, num_heads, intermediate_size, seed, max_position_embeddings)


def tiny_test_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """An even smaller Llama (hidden 64, 2 layers, 4 heads, intermediate 128) for fast unit tests."""
    return _llama(tokenizer, 64, 2, 4, 128, seed)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def _all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]


def _rows(pairs: Sequence[tuple[int, int]]) -> dict[str, list[str]]:
    return {"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]}


def make_datasets(
    num_train: int | None = None,
    seed: int = 0,
    heldout_size: int = DEFAULT_HELDOUT_SIZE,
    filler_max: int = 0,
    heldout_seed: int = HELDOUT_SEED,
) -> tuple[Dataset, Dataset]:
    """``(train_ds, heldout_ds)`` with string columns ``prompt`` (``"12+34="``) and ``answer`` (``"46"``).

    The held-out pairs are drawn with ``heldout_seed`` (fixed by default, independent of ``seed``) and never appear
    in ``train_ds``. ``train_ds`` holds every other pair shuffled with ``seed``; ``num_train`` truncates it, or, if
    larger than the 10,000 - ``heldout_size`` available pairs, repeats freshly shuffled passes over them.

    With ``filler_max > 0`` the training set gets an extra ``target`` column: the answer preceded by 0..filler_max
    ``.`` filler tokens (one draw per row), for anyone who wants a fixed supervised target. The held-out set keeps
    only ``prompt`` and ``answer``; the rewards and :func:`evaluate_greedy` judge against ``answer``.
    """
    pairs = _all_pairs()
    if not 0 < heldout_size < len(pairs):
        raise ValueError(f"heldout_size must be in 1..{len(pairs) - 1}, got {heldout_size}")
    if filler_max < 0:
        raise ValueError(f"filler_max must be >= 0, got {filler_max}")
    heldout_rng = random.Random(heldout_seed)
    heldout_idx = set(heldout_rng.sample(range(len(pairs)), heldout_size))
    heldout = [pairs[i] for i in sorted(heldout_idx)]
    pool = [p for i, p in enumerate(pairs) if i not in heldout_idx]

    rng = random.Random(seed)
    n = len(pool) if num_train is None else num_train
    if n <= 0:
        raise ValueError(f"num_train must be positive, got {num_train}")
    train: list[tuple[int, int]] = []
    while len(train) < n:
        epoch = list(pool)
        rng.shuffle(epoch)
        train.extend(epoch[: n - len(train)])

    train_rows = _rows(train)
    if filler_max > 0:
        train_rows["target"] = [FILLER * rng.randint(0, filler_max) + ans for ans in train_rows["answer"]]
    return Dataset.from_dict(train_rows), Dataset.from_dict(_rows(heldout))


# ----------------------------------------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------------------------------------


class ArithmeticReward:
    """TRL reward function: 1.0 iff the completion is exactly the answer's digits followed by EOS, else 0.0.

    The check runs on ``completion_ids`` rather than on the decoded ``completions``: TRL decodes with
    ``skip_special_tokens=True``, which hides a missing EOS and any stray BOS/PAD inside the completion. TRL truncates
    ``completion_ids`` after the first EOS, so "ends with EOS" means "stopped by itself".

    With ``allow_filler=True`` any number of leading ``.`` filler tokens is accepted before the digits (the filler
    variant of the task). With ``allow_steps=True`` (the three-term task, :mod:`k15_plugin.data.sum3`) the completion
    may show its work first: the answer is the digits after the last ``=``, and what comes before it may hold only
    digits, ``+`` and ``=`` (``"46+56=102"`` answers ``102``); as with a chain of thought, only the answer is judged.
    Malformed input of any kind scores 0.0; only a missing ``completion_ids`` or ``answer`` argument (a wiring
    mistake, not a bad sample) raises.

    Instances are picklable (they hold only ints and a small dict), as multi-process reward evaluation needs, and
    carry ``__name__`` because TRL logs rewards under that name.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase | None = None, allow_filler: bool = False, allow_steps: bool = False
    ) -> None:
        vocab = dict(VOCAB) if tokenizer is None else dict(tokenizer.get_vocab())
        eos_id = VOCAB[EOS] if tokenizer is None else tokenizer.eos_token_id
        if eos_id is None:
            raise ValueError("the tokenizer has no eos_token_id")
        self.__name__ = "arithmetic_correct"
        self.eos_token_id = int(eos_id)
        self.allow_filler = bool(allow_filler)
        self.allow_steps = bool(allow_steps)
        # Only digit and filler tokens may appear before EOS; anything else (BOS, PAD, '+', '=') makes it wrong.
        self._id_to_char = {int(i): tok for tok, i in vocab.items() if tok.isdigit() and len(tok) == 1}
        self._filler_id = vocab.get(FILLER)
        self._step_ids = {vocab.get(c) for c in "+="} - {None}
        self._equals_id = vocab.get("=")

    def score(self, completion_ids: Sequence[int], answer: str | int) -> float:
        """Reward of a single completion (token ids, EOS included) against ``answer``."""
        if isinstance(completion_ids, (str, bytes)):  # iterating would read characters as token ids
            return 0.0
        try:
            ids = [int(i) for i in completion_ids]
            target = str(answer).strip()
        except (TypeError, ValueError):
            return 0.0
        if not ids or ids[-1] != self.eos_token_id or not target.isdigit():
            return 0.0
        body = ids[:-1]
        if self.allow_filler and self._filler_id is not None:
            start = 0
            while start < len(body) and body[start] == self._filler_id:
                start += 1
            body = body[start:]
        if self.allow_steps and self._equals_id in body:
            last = len(body) - 1 - body[::-1].index(self._equals_id)
            work, body = body[:last], body[last + 1 :]
            if any(i not in self._id_to_char and i not in self._step_ids for i in work):
                return 0.0
        chars = [self._id_to_char.get(i) for i in body]
        if not chars or any(c is None for c in chars):
            return 0.0
        return 1.0 if "".join(chars) == target else 0.0  # type: ignore[arg-type]

    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
        answer: Sequence[str | int] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        if completion_ids is None or answer is None:
            raise TypeError(
                "ArithmeticReward needs `completion_ids` and `answer` (the dataset's answer column); "
                "TRL passes both when the dataset has an `answer` column"
            )
        if len(completion_ids) != len(answer):
            raise ValueError(f"got {len(completion_ids)} completions but {len(answer)} answers")
        return [self.score(ids, ans) for ids, ans in zip(completion_ids, answer, strict=True)]

    def __repr__(self) -> str:
        return (
            f"ArithmeticReward(eos_token_id={self.eos_token_id}, allow_filler={self.allow_filler}, "
            f"allow_steps={self.allow_steps})"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_kwargs(tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> dict:
    """``generate`` options for plain greedy decoding of the policy, whatever the checkpoint's generation config says.

    transformers fills every option ``generate`` is not given from the model's ``generation_config``; an instruct
    checkpoint's ``repetition_penalty`` (Qwen2.5: 1.05) or ``no_repeat_ngram_size`` would then change even greedy
    decoding, and TRL's rollouts do not use them.
    """
    return {
        "do_sample": False,
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def evaluate_greedy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    heldout_ds: Dataset,
    max_new_tokens: int | None = None,
    batch_size: int = 500,
    allow_filler: bool = False,
    allow_steps: bool = False,
) -> dict[str, float]:
    """Greedy held-out accuracy and mean completion length (tokens up to and including EOS).

    Prompts are left-padded with an attention mask, so ``generate`` derives position ids from the mask and scores
    exactly what a sampled rollout would see. Correctness uses :class:`ArithmeticReward` (``allow_filler`` selects
    the filler variant). ``max_new_tokens`` defaults to the longest correct completion: 4, or 4 + 6 with filler
    (more filler than that counts as wrong -- it would not fit). ``allow_steps``: worked answers are accepted (the
    three-term task; pass ``max_new_tokens``).
    """
    if max_new_tokens is None:
        max_new_tokens = _MAX_ANSWER_TOKENS + (6 if allow_filler else 0)
    reward = ArithmeticReward(tokenizer, allow_filler=allow_filler, allow_steps=allow_steps)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts, answers = list(heldout_ds["prompt"]), list(heldout_ds["answer"])
    correct, total_tokens = 0.0, 0
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.generate(**batch, **greedy_kwargs(tokenizer, max_new_tokens))
            completions = out[:, batch["input_ids"].shape[1] :].tolist()
            for ids, ans in zip(completions, answers[start : start + batch_size], strict=True):
                # generate pads finished rows with PAD after EOS; keep up to and including the first EOS.
                if tokenizer.eos_token_id in ids:
                    ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
                total_tokens += len(ids)
                correct += reward.score(ids, ans)
    finally:
        model.train(was_training)
    n = max(len(prompts), 1)
    return {"accuracy": correct / n, "mean_completion_tokens": total_tokens / n}


@torch.no_grad()
def sample_completion_lengths(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    heldout_ds: Dataset,
    *,
    num_samples: int = 8,
    max_new_tokens: int = LONGTAIL_MAX_NEW_TOKENS,
    temperature: float = 1.0,
    long_threshold: int = LONGTAIL_LONG[0],
    prompts_per_batch: int = 100,
    seed: int = 0,
    allow_filler: bool = True,
) -> dict[str, Any]:
    """Length statistics of ``num_samples`` sampled completions per held-out prompt (a GRPO-style group each).

    Plain ancestral sampling at ``temperature`` (no top-k/top-p, no repetition penalty), seeded with ``seed`` without
    touching the caller's global RNG; the result also depends on ``prompts_per_batch``. A completion's length counts
    its tokens up to and including the first EOS, or ``max_new_tokens`` if it never emitted one (truncated). Returns
    ``frac_long`` (completions of at least ``long_threshold`` tokens), ``mean_length``, ``frac_groups_with_long``
    (groups with at least one long completion), ``frac_truncated`` (no EOS within ``max_new_tokens``),
    ``frac_long_truncated`` (truncated among the long ones), ``accuracy`` (mean :class:`ArithmeticReward`),
    ``max_length``, and the settings used.
    """
    reward = ArithmeticReward(tokenizer, allow_filler=allow_filler)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts, answers = list(heldout_ds["prompt"]), list(heldout_ds["answer"])
    eos = tokenizer.eos_token_id
    lengths: list[int] = []
    truncated: list[bool] = []
    correct = 0.0
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), prompts_per_batch):
                batch = tokenizer(prompts[start : start + prompts_per_batch], return_tensors="pt", padding=True)
                batch = {k: v.to(device) for k, v in batch.items()}
                # greedy_kwargs with do_sample=False overridden: plain sampling, nothing reshaping the distribution.
                options = {
                    **greedy_kwargs(tokenizer, max_new_tokens),
                    "do_sample": True,
                    "temperature": temperature,
                    "top_k": 0,
                    "top_p": 1.0,
                }
                out = model.generate(**batch, **options, num_return_sequences=num_samples)
                completions = out[:, batch["input_ids"].shape[1] :].tolist()
                # generate repeats each prompt num_samples times in a row: row j belongs to prompt j // num_samples.
                batch_answers = answers[start : start + prompts_per_batch]
                for j, ids in enumerate(completions):
                    stopped = eos in ids
                    ids = ids[: ids.index(eos) + 1] if stopped else ids
                    lengths.append(len(ids) if stopped else max_new_tokens)
                    truncated.append(not stopped)
                    correct += reward.score(ids, batch_answers[j // num_samples])
    finally:
        model.train(was_training)
    n = max(len(lengths), 1)
    long = [length >= long_threshold for length in lengths]
    groups = [long[i : i + num_samples] for i in range(0, len(long), num_samples)]
    n_long = sum(long)
    return {
        "num_prompts": len(prompts),
        "num_samples": num_samples,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "long_threshold": long_threshold,
        "prompts_per_batch": prompts_per_batch,
        "seed": seed,
        "frac_long": n_long / n,
        "mean_length": sum(lengths) / n,
        "frac_groups_with_long": sum(any(g) for g in groups) / max(len(groups), 1),
        "frac_truncated": sum(truncated) / n,
        "frac_long_truncated": sum(t for t, lg in zip(truncated, long, strict=True) if lg) / max(n_long, 1),
        "max_length": max(lengths, default=0),
        "accuracy": correct / n,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Supervised warm start
# ----------------------------------------------------------------------------------------------------------------------


def _sft_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    filler: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``bos prompt [filler] answer eos`` ids and labels that score only the completion tokens.

    Right padding is safe here: with a causal mask no real token attends to the padding that follows it, and RoPE
    only sees relative positions, so these logits equal those of left-padded generation.
    """
    # Tokenize through the tokenizer itself (BOS added by its post-processor) so training sees exactly what TRL feeds.
    prompt_batch = tokenizer(list(prompts))["input_ids"]
    targets = [FILLER * k + a for a, k in zip(answers, filler, strict=True)]
    completion_batch = tokenizer(targets, add_special_tokens=False)["input_ids"]
    seqs, labels = [], []
    for prompt_ids, completion_ids in zip(prompt_batch, completion_batch, strict=True):
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
        seqs.append(list(prompt_ids) + completion_ids)
        labels.append([-100] * len(prompt_ids) + completion_ids)
    width = max(len(s) for s in seqs)
    input_ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return input_ids, label_ids


def _bucketed_sft_loss(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    filler: Sequence[int],
) -> torch.Tensor:
    """The warm-start loss (mean cross-entropy over completion tokens) with short and long rows in separate batches.

    Under the long-tailed mixture a batch is ~85% rows of at most 14 tokens and ~15% of up to 67; padding them all to
    the longest would spend about two thirds of the compute on padding. Same loss as one padded batch, up to float
    rounding (used for ``filler_dist="longtail"`` only, so the other variants stay exactly as they were built).
    """
    device = next(model.parameters()).device
    buckets = [
        [j for j, k in enumerate(filler) if k < LONGTAIL_LONG[0]],
        [j for j, k in enumerate(filler) if k >= LONGTAIL_LONG[0]],
    ]
    total: torch.Tensor | None = None
    n_tokens = 0
    for rows in buckets:
        if not rows:
            continue
        input_ids, labels = _sft_batch(
            tokenizer, [prompts[j] for j in rows], [answers[j] for j in rows], [filler[j] for j in rows]
        )
        input_ids, labels = input_ids.to(device), labels.to(device)
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        targets = labels[:, 1:].reshape(-1)
        part = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets, reduction="sum")
        total = part if total is None else total + part
        n_tokens += int((targets != -100).sum())
    assert total is not None
    return total / n_tokens


def _check_filler_args(filler_max: int, filler_dist: str) -> None:
    if filler_dist not in FILLER_DISTS:
        raise ValueError(f"filler_dist must be one of {FILLER_DISTS}, got {filler_dist!r}")
    if filler_max < 0:
        raise ValueError(f"filler_max must be >= 0, got {filler_max}")
    if filler_dist == "longtail" and filler_max != 0:
        raise ValueError(
            f"filler_max applies to filler_dist='uniform' only; the long-tailed mixture is fixed, got {filler_max}"
        )


def sample_filler_counts(
    n: int, generator: torch.Generator, filler_max: int = 0, filler_dist: str = "uniform"
) -> list[int]:
    """``n`` filler counts drawn with ``generator``: uniform in 0..filler_max, or the long-tailed mixture.

    ``"longtail"``: with probability :data:`LONGTAIL_P_LONG` uniform in :data:`LONGTAIL_LONG`, otherwise uniform in
    :data:`LONGTAIL_SHORT` (``filler_max`` is not used and must be 0). ``"uniform"`` makes exactly one
    ``torch.randint(filler_max + 1, (n,))`` draw, as the shipped plain and filler checkpoints were built with.
    """
    _check_filler_args(filler_max, filler_dist)
    if filler_dist == "uniform":
        return torch.randint(filler_max + 1, (n,), generator=generator).tolist()
    is_long = torch.rand(n, generator=generator) < LONGTAIL_P_LONG
    short = torch.randint(LONGTAIL_SHORT[0], LONGTAIL_SHORT[1] + 1, (n,), generator=generator)
    long = torch.randint(LONGTAIL_LONG[0], LONGTAIL_LONG[1] + 1, (n,), generator=generator)
    return torch.where(is_long, long, short).tolist()


def supervised_warm_start(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_ds: Dataset,
    heldout_ds: Dataset,
    *,
    target_accuracy: float = 0.22,
    max_steps: int = 600,
    batch_size: int = 256,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    warmup_steps: int = 60,
    check_every: int = 25,
    seed: int = 0,
    filler_max: int = 0,
    filler_dist: str = "uniform",
    snapshot: str | Path | None = None,
    progress: bool = True,
    min_steps: int = 0,
) -> dict[str, Any]:
    """Teacher-force ``prompt [filler] answer eos`` until held-out greedy accuracy reaches ``target_accuracy``.

    AdamW (betas 0.9/0.98, torch's default weight decay 0.01) with linear warm-up then cosine decay planned over
    ``max_steps``; the loss is the mean cross-entropy over completion tokens only. Accuracy is checked every
    ``check_every`` steps and training stops at the first check that reaches the target -- a threshold rather than a
    step count or time budget, because accuracy rises steeply (a few % to ~50% within ~100 steps) and the demo wants a
    policy that is right only sometimes.
    With ``filler_max > 0`` every sample gets a fresh 0..filler_max filler count and accuracy accepts filler.
    With ``filler_dist="longtail"`` (``filler_max`` left at 0) the counts come from the long-tailed mixture (see
    :func:`sample_filler_counts`), accuracy accepts filler and greedy checks decode up to
    :data:`LONGTAIL_MAX_NEW_TOKENS` tokens; the model needs ``max_position_embeddings=128`` for the long samples.

    ``min_steps``: no check stops training before this step (for a model that starts above the target, such as the
    long-tailed variant fine-tuned from the filler checkpoint: it must first learn the new filler distribution).

    ``snapshot``: a file where the full training state (model, optimizer, schedule, sampling generator, history,
    elapsed seconds) is saved at every check; if it exists when the call starts, training resumes from it and ends
    exactly as an uninterrupted run would. It is deleted on return. For long builds on a machine where the process
    may be stopped; the model passed in must be freshly built the same way as in the interrupted call.

    Returns ``steps``, ``accuracy`` and ``mean_completion_tokens`` at the last check, ``seconds`` (training plus
    checks, summed over resumed runs), ``reached_target`` and a ``history`` of ``(step, accuracy)`` pairs.
    """
    if max_steps <= 0 or check_every <= 0 or batch_size <= 0:
        raise ValueError("max_steps, check_every and batch_size must be positive")
    _check_filler_args(filler_max, filler_dist)
    gen = torch.Generator().manual_seed(seed)
    prompts, answers = list(train_ds["prompt"]), list(train_ds["answer"])
    longtail = filler_dist == "longtail"
    allow_filler = filler_max > 0 or longtail
    # None keeps evaluate_greedy's default (4, or 4 + 6 with filler), as the shipped plain and filler checkpoints had.
    eval_max_new_tokens = LONGTAIL_MAX_NEW_TOKENS if longtail else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)

    def lr_lambda(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_frac = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_frac)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    history: list[tuple[int, float]] = []
    metrics: dict[str, float] = {"accuracy": 0.0, "mean_completion_tokens": 0.0}
    device = next(model.parameters()).device
    start = time.perf_counter()
    step = 0
    elapsed_before = 0.0  # seconds spent by the interrupted runs this one resumes
    # Everything that decides how training goes on; a snapshot taken under other settings is refused.
    settings = {
        "target_accuracy": target_accuracy,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "warmup_steps": warmup_steps,
        "check_every": check_every,
        "seed": seed,
        "filler_max": filler_max,
        "filler_dist": filler_dist,
        "num_train": len(prompts),
        "num_heldout": len(heldout_ds),
        "min_steps": min_steps,
    }
    snapshot = Path(snapshot) if snapshot is not None else None
    if snapshot is not None and snapshot.is_file():
        state = torch.load(snapshot, weights_only=False)
        if state["settings"] != settings:
            raise ValueError(f"snapshot {snapshot} was taken with {state['settings']}, not {settings}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        step, history, metrics = state["step"], [tuple(h) for h in state["history"]], state["metrics"]
        elapsed_before = state["seconds"]
        if progress:
            print(f"[warm start] resumed from {snapshot} at step {step}", flush=True)
    model.train()
    while step < max_steps and not (history and metrics["accuracy"] >= target_accuracy):
        idx = torch.randint(len(prompts), (batch_size,), generator=gen).tolist()
        filler = sample_filler_counts(batch_size, gen, filler_max, filler_dist)
        if longtail:
            loss = _bucketed_sft_loss(model, tokenizer, [prompts[i] for i in idx], [answers[i] for i in idx], filler)
        else:
            input_ids, labels = _sft_batch(tokenizer, [prompts[i] for i in idx], [answers[i] for i in idx], filler)
            input_ids, labels = input_ids.to(device), labels.to(device)
            logits = model(input_ids=input_ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        if (step % check_every == 0 and step >= min_steps) or step == max_steps:
            metrics = evaluate_greedy(
                model, tokenizer, heldout_ds, max_new_tokens=eval_max_new_tokens, allow_filler=allow_filler
            )
            history.append((step, metrics["accuracy"]))
            if progress:
                print(
                    f"[warm start] step {step:4d}  loss {loss.item():.4f}  heldout acc {metrics['accuracy']:.3f}  "
                    f"mean len {metrics['mean_completion_tokens']:.2f}  "
                    f"{elapsed_before + time.perf_counter() - start:.1f}s",
                    flush=True,
                )
            if snapshot is not None:
                state = {
                    "settings": settings,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "generator": gen.get_state(),
                    "step": step,
                    "history": history,
                    "metrics": metrics,
                    "seconds": elapsed_before + time.perf_counter() - start,
                }
                torch.save(state, f"{snapshot}.tmp")
                os.replace(f"{snapshot}.tmp", snapshot)  # never a half-written snapshot
    model.eval()
    if snapshot is not None:
        snapshot.unlink(missing_ok=True)
    return {
        "steps": step,
        "accuracy": metrics["accuracy"],
        "mean_completion_tokens": metrics["mean_completion_tokens"],
        "seconds": elapsed_before + time.perf_counter() - start,
        "reached_target": metrics["accuracy"] >= target_accuracy,
        "history": history,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Shipped checkpoint
# ----------------------------------------------------------------------------------------------------------------------


def load_demo_checkpoint(path: str | Path | None = None) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` from a checkpoint directory; defaults to the shipped :data:`DEMO_CHECKPOINT_DIR`.

    Pass :data:`DEMO_FILLER_CHECKPOINT_DIR` for the filler variant or :data:`DEMO_LONGTAIL_CHECKPOINT_DIR` for the
    long-tailed one. Everything is local: no hub access.
    """
    directory = Path(path) if path is not None else DEMO_CHECKPOINT_DIR
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {directory}; build it with `python -m k15_plugin.data.make_demo_checkpoint`"
        )
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = LlamaForCausalLM.from_pretrained(directory)
    model.eval()
    return model, tokenizer


def read_warm_start_info(path: str | Path | None = None) -> dict[str, Any]:
    """The ``warm_start.json`` written next to a checkpoint (measured accuracy, steps, seconds, filler_max...).

    Checkpoints built before ``filler_dist`` existed do not record it; it is filled in as ``"uniform"``.
    """
    directory = Path(path) if path is not None else DEMO_CHECKPOINT_DIR
    info = json.loads((directory / WARM_START_FILE).read_text())
    info.setdefault("filler_dist", "uniform")
    return info
