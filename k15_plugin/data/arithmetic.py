"""Built-in demo task: two-digit addition with a verifiable reward, a tiny Llama, and a supervised warm start.

The task is small enough to run RL on one CPU thread in a couple of minutes while still showing a clear learning
curve: the prompt is ``"a+b="`` with ``a, b`` uniform in 0..99 and the answer is the decimal sum followed by EOS.
Only 10,000 distinct pairs exist, so a fixed held-out set of 500 pairs is excluded from training and scored with
greedy decoding.

Pieces:

* :func:`make_datasets` -- ``(train, heldout)`` ``datasets.Dataset`` s with ``prompt`` and ``answer`` columns.
* :class:`ArithmeticReward` -- a picklable TRL reward function (1.0 iff the completion is the answer then EOS).
* :func:`evaluate_greedy` -- batched greedy decoding on the held-out set.
* :func:`sample_completion_lengths` -- length statistics of sampled (temperature 1) completions.
* :func:`load_demo_checkpoint` -- the shipped warm-started checkpoints (built by
  ``python -m k15_plugin.data.build.make_demo_checkpoint``).

The build-time tooling is :mod:`k15_plugin.data.build.warm_start`, which this runtime module does not import:
``build_tokenizer`` (the 16-token character-level tokenizer the shipped checkpoints store), ``build_model`` /
``tiny_test_model`` (``LlamaForCausalLM`` built from a config) and ``supervised_warm_start`` (teacher forcing until
the held-out greedy accuracy crosses a threshold, so that RL starts from a policy that is right sometimes).

The optional *filler* variant (``filler_max > 0``) puts 0..filler_max random ``.`` tokens before the answer in the
warm-start data, so the policy emits answers of varying length; this gives the length penalty something to act on.

The *long-tailed* variant (``filler_dist="longtail"``, shipped as :data:`DEMO_LONGTAIL_CHECKPOINT_DIR`) draws the
filler count from a mixture instead: none with probability 0.85, 40..56 with probability 0.15. Sampled completions
are then mostly 2-4 tokens long with a minority of up to 60 tokens (56 filler + 3 digits + EOS), the shape that
partial rollouts (cutting long generations into segments) are for. Its model has ``max_position_embeddings=128``
(prompt up to 7 tokens + 64 new tokens) and its ``generation_config.max_new_tokens`` is 64.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

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
    "evaluate_greedy",
    "generate_completions",
    "greedy_kwargs",
    "load_demo_checkpoint",
    "make_datasets",
    "read_warm_start_info",
    "sample_completion_lengths",
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
    "tiny_demo_chain": Path(__file__).resolve().parent / "demo_checkpoint_chain",
    # a tiny LLaVA for the image task (k15_plugin.data.vision.load_vision_checkpoint loads it)
    "tiny_demo_vision": Path(__file__).resolve().parent / "demo_checkpoint_vision",
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
def generate_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    num_samples: int = 1,
    temperature: float | None = None,
    prompts_per_batch: int = 100,
    seed: int = 0,
) -> list[list[int]]:
    """Completion token ids of each prompt, up to and including the first EOS (all ``max_new_tokens`` when it never
    came), ``num_samples`` per prompt in prompt order (prompt i's at ``i * num_samples ..``).

    Greedy with ``temperature=None``; else plain ancestral sampling at ``temperature`` (no top-k/top-p, nothing
    reshaping the distribution), seeded with ``seed`` without touching the caller's global RNG (the draws also depend
    on ``prompts_per_batch``). Prompts are left-padded with an attention mask, so ``generate`` derives position ids
    from the mask, as a rollout sees them. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    options = greedy_kwargs(tokenizer, max_new_tokens)
    if temperature is not None:
        options = {**options, "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    eos, out = tokenizer.eos_token_id, []
    rng = torch.random.fork_rng(devices=[] if device.type == "cpu" else [device])
    try:
        with rng if temperature is not None else contextlib.nullcontext():
            if temperature is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prompts), prompts_per_batch):
                batch = tokenizer(list(prompts[start : start + prompts_per_batch]), return_tensors="pt", padding=True)
                batch = {k: v.to(device) for k, v in batch.items()}
                ids = model.generate(**batch, **options, num_return_sequences=num_samples)
                # generate pads finished rows with PAD after EOS; keep up to and including the first EOS
                for row in ids[:, batch["input_ids"].shape[1] :].tolist():
                    out.append(row[: row.index(eos) + 1] if eos in row else row)
    finally:
        model.train(was_training)
    return out


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


def greedy_scores(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Dataset,
    max_new_tokens: int,
    prompts_per_batch: int = 500,
    allow_filler: bool = False,
    allow_steps: bool = False,
) -> tuple[list[float], list[list[int]]]:
    """Greedy completions of ``rows["prompt"]`` and their :class:`ArithmeticReward` scores against ``rows["answer"]``:
    ``(scores, completion ids up to and including EOS)``, one each per row.

    Prompts are left-padded with an attention mask, so ``generate`` derives position ids from the mask and scores
    exactly what a sampled rollout would see. ``prompts_per_batch`` changes the padding, so a caller that records
    its figures (a checkpoint's ``warm_start.json``) keeps its own value.
    """
    reward = ArithmeticReward(tokenizer, allow_filler=allow_filler, allow_steps=allow_steps)
    completions = generate_completions(
        model, tokenizer, list(rows["prompt"]), max_new_tokens, prompts_per_batch=prompts_per_batch
    )
    scores = [reward.score(ids, ans) for ids, ans in zip(completions, rows["answer"], strict=True)]
    return scores, completions


def mean_by(values: Sequence[float], keys: Sequence[Any]) -> dict[Any, float]:
    """Mean of ``values`` per distinct key, keys sorted (accuracy per difficulty)."""
    groups: dict[Any, list[float]] = {}
    for v, k in zip(values, keys, strict=True):
        groups.setdefault(k, []).append(v)
    return {k: sum(groups[k]) / len(groups[k]) for k in sorted(groups)}


def evaluate_greedy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    heldout_ds: Dataset,
    max_new_tokens: int | None = None,
    batch_size: int = 500,
    allow_filler: bool = False,
    allow_steps: bool = False,
) -> dict[str, float]:
    """Greedy held-out accuracy and mean completion length (tokens up to and including EOS), by :func:`greedy_scores`.

    ``allow_filler`` selects the filler variant of the checker. ``max_new_tokens`` defaults to the longest correct
    completion: 4, or 4 + 6 with filler (more filler than that counts as wrong -- it would not fit).
    ``allow_steps``: worked answers are accepted (the three-term and chain tasks; pass ``max_new_tokens``).
    """
    if max_new_tokens is None:
        max_new_tokens = _MAX_ANSWER_TOKENS + (6 if allow_filler else 0)
    scores, completions = greedy_scores(
        model, tokenizer, heldout_ds, max_new_tokens, batch_size, allow_filler=allow_filler, allow_steps=allow_steps
    )
    n = max(len(scores), 1)
    return {"accuracy": sum(scores) / n, "mean_completion_tokens": sum(map(len, completions)) / n}


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
    prompts, answers = list(heldout_ds["prompt"]), list(heldout_ds["answer"])
    completions = generate_completions(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        num_samples=num_samples,
        temperature=temperature,
        prompts_per_batch=prompts_per_batch,
        seed=seed,
    )
    eos = tokenizer.eos_token_id
    truncated = [eos not in ids for ids in completions]
    lengths = [max_new_tokens if cut else len(ids) for ids, cut in zip(completions, truncated, strict=True)]
    correct = sum(reward.score(ids, answers[j // num_samples]) for j, ids in enumerate(completions))
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
            f"no checkpoint at {directory}; build it with `python -m k15_plugin.data.build.make_demo_checkpoint`"
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
