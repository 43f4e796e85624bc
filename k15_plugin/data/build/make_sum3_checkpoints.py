"""Build the shipped long and short checkpoints of the three-term demo task (``k15_plugin.data.sum3``).

    python -m k15_plugin.data.build.make_sum3_checkpoints      # -> k15_plugin/data/demo_checkpoint_sum3_{long,short}/

1. **long**: a fresh demo Llama (the 0.53M-parameter model of ``k15_plugin.data.build.warm_start``, seed 2) trained by
   teacher forcing on ``prompt completion EOS`` rows whose completion format is drawn per row from
   :data:`~k15_plugin.data.sum3.LONG_MIX` (verbose, steps or direct);
2. **short**: the long model fine-tuned on ``direct`` completions only.

Both use AdamW (betas 0.9/0.98, weight decay 0.01), batches of 256 fresh training triples, a linear warm-up then
cosine decay. Each directory gets a ``warm_start.json`` with greedy held-out accuracy and tokens and, for 8 sampled
completions per held-out prompt (temperature 1), the share and the accuracy of each format: the measurement that
long answers help. About 6 minutes on one CPU thread; deterministic for a given seed on a given machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from k15_plugin.data.arithmetic import evaluate_greedy, generate_completions
from k15_plugin.data.build.warm_start import build_model, build_tokenizer, finetune_on_formats, save_measured
from k15_plugin.data.sum3 import (
    FORMATS,
    LONG_MIX,
    MAX_NEW_TOKENS,
    SUM3_LONG_CHECKPOINT_DIR,
    SUM3_SHORT_CHECKPOINT_DIR,
    completion,
    make_sum3_datasets,
    parse_prompt,
)

SEED = 2
LONG_STEPS, LONG_LR = 600, 3e-3
SHORT_STEPS, SHORT_LR = 300, 1e-3
BATCH = 256


def answer_format(text: str) -> str:
    """The format of a completion by its ``=`` count: 2 verbose, 1 steps, 0 direct (anything else: ``other``)."""
    return {2: "verbose", 1: "steps", 0: "direct"}.get(text.count("="), "other")


def train(model, tokenizer, prompts: list[str], mix: dict[str, float], steps: int, lr: float, seed: int) -> float:
    """Teacher forcing on ``prompt completion(format ~ mix) EOS`` (:func:`finetune_on_formats`, batches of
    :data:`BATCH`); returns the seconds it took."""
    return finetune_on_formats(
        model,
        tokenizer,
        prompts,
        mix,
        lambda p, fmt: completion(*parse_prompt(p), fmt),
        steps=steps,
        lr=lr,
        seed=seed,
        batch=BATCH,
        log_every=100,
    )


@torch.no_grad()
def sampled_formats(model, tokenizer, heldout, n: int = 8, seed: int = 0) -> dict:
    """Share and accuracy of each format among ``n`` temperature-1 samples per held-out prompt."""
    from k15_plugin.data.arithmetic import ArithmeticReward

    reward = ArithmeticReward(tokenizer, allow_steps=True)
    counts = {f: [0, 0.0] for f in (*FORMATS, "other")}
    prompts, answers = list(heldout["prompt"]), list(heldout["answer"])
    samples = generate_completions(
        model, tokenizer, prompts, MAX_NEW_TOKENS, num_samples=n, temperature=1.0, prompts_per_batch=100, seed=seed
    )
    for j, ids in enumerate(samples):
        fmt = answer_format(tokenizer.decode(ids, skip_special_tokens=True))
        counts[fmt][0] += 1
        counts[fmt][1] += reward.score(ids, answers[j // n])
    total = sum(c for c, _ in counts.values())
    return {
        f: {"share": round(c / total, 4), "accuracy": round(s / c, 4) if c else None} for f, (c, s) in counts.items()
    }


def save(model, tokenizer, out: Path, info: dict, heldout) -> dict:
    """Save ``model`` and ``tokenizer`` to ``out`` with a ``warm_start.json``
    (:func:`~k15_plugin.data.build.warm_start.save_measured`): ``info`` plus the held-out greedy accuracy and mean
    completion tokens and the sampled formats, measured on the checkpoint reloaded from disk."""

    def measure(reloaded, reloaded_tok) -> dict:
        greedy = evaluate_greedy(reloaded, reloaded_tok, heldout, max_new_tokens=MAX_NEW_TOKENS, allow_steps=True)
        return {
            "heldout_size": len(heldout),
            "heldout_accuracy": greedy["accuracy"],
            "heldout_mean_completion_tokens": round(greedy["mean_completion_tokens"], 4),
            "sampled_formats": sampled_formats(reloaded, reloaded_tok, heldout),
        }

    return save_measured(model, tokenizer, out, info, measure, MAX_NEW_TOKENS)


def main(argv: list[str] | None = None) -> None:
    """Command line of the module docstring: train and save the long model, then fine-tune it into the short one;
    prints each ``warm_start.json`` as a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-long", type=Path, default=SUM3_LONG_CHECKPOINT_DIR)
    parser.add_argument("--out-short", type=Path, default=SUM3_SHORT_CHECKPOINT_DIR)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--long-steps", type=int, default=LONG_STEPS)
    parser.add_argument("--short-steps", type=int, default=SHORT_STEPS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    train_ds, heldout = make_sum3_datasets(seed=args.seed)
    prompts = list(train_ds["prompt"])
    common = {
        "task": "three-term addition a+b+c=, a,b,c in 0..99 (k15_plugin.data.sum3)",
        "seed": args.seed,
        "batch_size": BATCH,
        "threads": args.threads,
    }

    print("long model: formats", LONG_MIX, flush=True)
    model = build_model(tokenizer, seed=args.seed)
    seconds = train(model, tokenizer, prompts, LONG_MIX, args.long_steps, LONG_LR, args.seed)
    info = save(
        model,
        tokenizer,
        args.out_long,
        {**common, "formats": LONG_MIX, "steps": args.long_steps, "lr": LONG_LR, "seconds": round(seconds, 1)},
        heldout,
    )
    print(json.dumps({"long": info}), flush=True)

    print("short model: the long model fine-tuned on direct answers", flush=True)
    seconds = train(model, tokenizer, prompts, {"direct": 1.0}, args.short_steps, SHORT_LR, args.seed + 1)
    info = save(
        model,
        tokenizer,
        args.out_short,
        {
            **common,
            "formats": {"direct": 1.0},
            "init_from": args.out_long.name,
            "steps": args.short_steps,
            "lr": SHORT_LR,
            "seconds": round(seconds, 1),
        },
        heldout,
    )
    print(json.dumps({"short": info}), flush=True)


if __name__ == "__main__":
    main()
