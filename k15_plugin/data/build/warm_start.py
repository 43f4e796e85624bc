"""Build-time tooling of the arithmetic demo task: the tokenizer and models built in code, and the warm start.

Used by the checkpoint makers (:mod:`k15_plugin.data.build.make_demo_checkpoint`,
:mod:`k15_plugin.data.build.make_sum3_checkpoints`), by tests that need a fresh tiny model and by benchmarks; never
by training itself. The runtime task (datasets, reward, evaluation, the shipped checkpoints) stays in
:mod:`k15_plugin.data.arithmetic`, which does not import this module, so ``k15-train`` does not load the warm-start
trainer. The shipped checkpoints store the tokenizer built here (``tokenizer.json``) and load it with
``AutoTokenizer``.

* :func:`build_tokenizer` -- a 16-token character-level tokenizer built in code (no download). ``tokenizer("12+34=")``
  gives ``[bos, 1, 2, +, 3, 4, =]``, which is exactly how TRL's ``GRPOTrainer`` tokenizes string prompts
  (``processing_class(text=prompts)`` with the default ``add_special_tokens=True``).
* :func:`build_model` / :func:`tiny_test_model` -- ``LlamaForCausalLM`` built from a config.
* :func:`sample_filler_counts` -- the filler counts of the warm-start targets (uniform, or the long-tailed mixture).
* :func:`supervised_warm_start` -- teacher forcing until the held-out greedy accuracy crosses a threshold, so that RL
  starts from a policy that is right sometimes (GRPO needs a non-zero success rate to get any signal); resumable from
  a snapshot.
"""

from __future__ import annotations

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
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from k15_plugin.data.arithmetic import (
    _MAX_ANSWER_TOKENS,
    BOS,
    EOS,
    FILLER,
    FILLER_DISTS,
    LONGTAIL_LONG,
    LONGTAIL_MAX_NEW_TOKENS,
    LONGTAIL_P_LONG,
    LONGTAIL_SHORT,
    PAD,
    VOCAB,
    WARM_START_FILE,
    evaluate_greedy,
    load_demo_checkpoint,
)

__all__ = [
    "build_model",
    "build_tokenizer",
    "causal_lm_loss",
    "sample_filler_counts",
    "save_measured",
    "sft_batch",
    "supervised_warm_start",
    "tiny_test_model",
]


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
    return seeded_model(LlamaForCausalLM, config, seed, tokenizer, _MAX_ANSWER_TOKENS)


def seeded_model(model_cls, config, seed: int, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int):
    """``model_cls(config)`` initialised under ``seed``, with a greedy generation config of ``max_new_tokens``.

    Only the initialisation is seeded and the global RNG is restored afterwards, so building a model has no side
    effect on whatever sampling the caller does next."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=max_new_tokens,
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
# Supervised warm start
# ----------------------------------------------------------------------------------------------------------------------


def sft_batch(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], targets: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``bos prompt target eos`` ids and labels that score only the target's tokens and the EOS.

    Right padding is safe here: with a causal mask no real token attends to the padding that follows it, and RoPE
    only sees relative positions, so these logits equal those of left-padded generation.
    """
    # Tokenize through the tokenizer itself (BOS added by its post-processor) so training sees exactly what TRL feeds.
    prompt_batch = tokenizer(list(prompts))["input_ids"]
    completion_batch = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    seqs, labels = [], []
    for prompt_ids, completion_ids in zip(prompt_batch, completion_batch, strict=True):
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
        seqs.append(list(prompt_ids) + completion_ids)
        labels.append([-100] * len(prompt_ids) + completion_ids)
    width = max(len(s) for s in seqs)
    input_ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return input_ids, label_ids


def _sft_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    filler: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sft_batch` of ``[filler] answer`` targets (``filler[i]`` filler tokens before answer i)."""
    return sft_batch(tokenizer, prompts, [FILLER * k + a for a, k in zip(answers, filler, strict=True)])


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` over the labelled positions of :func:`sft_batch`'s batch."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))


def finetune_on_formats(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    mix: dict[str, float],
    target,
    *,
    steps: int,
    lr: float,
    seed: int,
    batch: int,
    log_every: int = 0,
) -> float:
    """Teacher forcing on ``prompt target(prompt, format) EOS``: ``steps`` batches of ``batch`` prompts drawn from
    ``prompts``, each row's format drawn from ``mix`` (format -> weight), AdamW (betas 0.9/0.98, weight decay 0.01) at
    ``lr`` with a linear warm-up over a tenth of the steps then a cosine decay to 0; seeded by ``seed`` alone (rows,
    then formats, per batch). Prints the loss every ``log_every`` steps (0: never). Returns the seconds it took."""
    rng = random.Random(seed)
    names, weights = list(mix), list(mix.values())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        rows = [prompts[rng.randrange(len(prompts))] for _ in range(batch)]
        targets = [target(p, rng.choices(names, weights)[0]) for p in rows]
        loss = causal_lm_loss(model, *sft_batch(tokenizer, rows, targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s", flush=True)
    model.eval()
    return time.perf_counter() - start


def save_measured(
    model, tokenizer: PreTrainedTokenizerBase, out: Path, info: dict, measure, max_new_tokens: int, load=None
) -> dict:
    """Save ``model`` and ``tokenizer`` to ``out`` with a ``warm_start.json``; returns what that file holds.

    ``info`` is extended with ``measure(model, tokenizer)`` (a dict), the parameter count and the versions, measured on
    the checkpoint reloaded from disk (what a user of the files gets) by ``load(directory) -> (model, tokenizer)``
    (default :func:`~k15_plugin.data.arithmetic.load_demo_checkpoint`; a processor serves as the tokenizer). Written to
    ``<out>.tmp`` first and renamed over ``out``, so an interrupted build leaves no half checkpoint.
    ``max_new_tokens`` becomes the saved generation budget.
    """
    import json
    import platform
    import shutil

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config.max_new_tokens = max_new_tokens
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    reloaded, reloaded_tok = (load or load_demo_checkpoint)(tmp)
    info = {
        **info,
        **measure(reloaded, reloaded_tok),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    (tmp / WARM_START_FILE).write_text(json.dumps(info, indent=2) + "\n")
    for f in tmp.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; package data must be world-readable
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


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
            loss = causal_lm_loss(model, input_ids.to(device), labels.to(device))
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
