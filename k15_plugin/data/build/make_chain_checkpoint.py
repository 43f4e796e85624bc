"""Build the shipped checkpoint of the chained-addition task (``k15_plugin.data.chain``): ``tiny_demo_chain``.

    python -m k15_plugin.data.build.make_chain_checkpoint      # -> k15_plugin/data/demo_checkpoint_chain/

A fresh Llama (the demo tokenizer; hidden 128, :data:`LAYERS` layers, positions for the longest chain) trained by
teacher forcing on ``prompt completion EOS`` rows, k uniform in 2..8, whose completion format is drawn per row from
:data:`MIX` (verbose, steps or direct). AdamW (betas 0.9/0.98, weight decay 0.01), batches of :data:`BATCH` fresh
chains, a linear warm-up then a constant learning rate.

Training stops at the first check that reaches :data:`TARGET_ACCURACY` (greedy accuracy on a fixed check set of the
training distribution, not the held-out set), or after ``--max-steps``: the checkpoint is meant to be right sometimes,
with headroom at every k, so RL has something to learn. Checks come every :data:`CHECK_EVERY` steps, then every
:data:`FINE_CHECK_EVERY` once the accuracy reaches :data:`RISING`: measured on a first build, the accuracy stays near
zero for about 750 steps and then jumps past 50 % within 250.

``warm_start.json`` records greedy held-out accuracy and tokens, overall and per k, and for 4 sampled completions per
held-out prompt (temperature 1) the share and accuracy of each format and the length distribution.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from k15_plugin.data.arithmetic import ArithmeticReward, generate_completions, greedy_scores, mean_by
from k15_plugin.data.build.warm_start import build_model, build_tokenizer, causal_lm_loss, save_measured, sft_batch
from k15_plugin.data.chain import FORMATS, completion, make_chain_datasets, max_new_tokens, parse_prompt

SEED = 0
LAYERS = 2
MIX = {"verbose": 0.5, "steps": 0.35, "direct": 0.15}
BATCH = 128
LR = 2e-3
WARMUP = 100
CHECK_EVERY = 250
FINE_CHECK_EVERY = 25  # once the check accuracy reaches RISING
RISING = 0.02
CHECK_SIZE = 280  # 40 chains per k of the training distribution
TARGET_ACCURACY = 0.3
MAX_STEPS = 6000
MAX_POSITIONS = 160  # BOS + the longest prompt (25) + the longest completion (115) fits


def answer_format(text: str, prompt: str) -> str:
    """The format of a chain completion: ``verbose`` (it restates the prompt first), ``direct`` (digits only) or
    ``steps`` (any other worked answer)."""
    if text.startswith(prompt):
        return "verbose"
    return "direct" if text.isdigit() else "steps"


def measure(model, tokenizer, rows, samples: int = 0) -> dict:
    """Greedy accuracy and tokens, overall and per k; with ``samples``, the sampled formats and lengths too."""
    was_training = model.training
    model.eval()
    reward = ArithmeticReward(tokenizer, allow_steps=True)
    prompts, answers = list(rows["prompt"]), list(rows["answer"])
    scores, greedy = greedy_scores(model, tokenizer, rows, max_new_tokens(), prompts_per_batch=64, allow_steps=True)
    out = {
        "accuracy": round(sum(scores) / len(scores), 4),
        "mean_tokens": round(sum(map(len, greedy)) / len(greedy), 2),
        "accuracy_by_k": {k: round(v, 4) for k, v in mean_by(scores, rows["difficulty"]).items()},
    }
    if samples:
        sampled = generate_completions(
            model, tokenizer, prompts, max_new_tokens(), num_samples=samples, temperature=1.0, prompts_per_batch=64
        )
        lengths = sorted(map(len, sampled))
        formats: dict[str, list[float]] = {f: [] for f in FORMATS}
        for j, ids in enumerate(sampled):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            formats[answer_format(text, prompts[j // samples])].append(reward.score(ids, answers[j // samples]))
        tail = lengths[int(0.9 * len(lengths)) :]
        out["sampled"] = {
            "accuracy": round(sum(sum(v) for v in formats.values()) / len(sampled), 4),
            "mean_tokens": round(statistics.mean(lengths), 2),
            "median_tokens": statistics.median(lengths),
            "longest_tenth_mean_tokens": round(statistics.mean(tail), 2),
            "formats": {
                f: {"share": round(len(v) / len(sampled), 4), "accuracy": round(statistics.mean(v), 4) if v else None}
                for f, v in formats.items()
            },
        }
    model.train(was_training)
    return out


def train(model, tokenizer, prompts: list[str], check_rows, args) -> tuple[int, float, list[dict]]:
    """Teacher forcing until the check set's greedy accuracy reaches ``args.target`` (or ``args.max_steps``);
    returns (steps, seconds, the checks)."""
    rng = random.Random(args.seed)
    names, weights = list(MIX), list(MIX.values())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP))
    start, checks = time.perf_counter(), []
    model.train()
    next_check = CHECK_EVERY
    for step in range(1, args.max_steps + 1):
        rows = [prompts[rng.randrange(len(prompts))] for _ in range(BATCH)]
        targets = [completion(parse_prompt(p), rng.choices(names, weights)[0]) for p in rows]
        loss = causal_lm_loss(model, *sft_batch(tokenizer, rows, targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step == next_check:
            check = {"step": step, "loss": round(loss.item(), 4), **measure(model, tokenizer, check_rows)}
            check["seconds"] = round(time.perf_counter() - start, 1)
            checks.append(check)
            print(json.dumps(check), flush=True)
            if check["accuracy"] >= args.target:
                break
            # accuracy jumps from a few percent to over half within a few hundred steps: once it starts to rise,
            # check often enough to stop inside the jump
            next_check += FINE_CHECK_EVERY if check["accuracy"] >= RISING else CHECK_EVERY
    model.eval()
    return step, time.perf_counter() - start, checks


def save(model, tokenizer, out: Path, info: dict, heldout) -> dict:
    """Save to ``out`` with a ``warm_start.json`` (:func:`~k15_plugin.data.build.warm_start.save_measured`): ``info``
    plus :func:`measure` of the checkpoint reloaded from disk, with 4 samples per held-out prompt."""

    def measured(reloaded, reloaded_tok) -> dict:
        return {"heldout_size": len(heldout), "heldout": measure(reloaded, reloaded_tok, heldout, samples=4)}

    return save_measured(model, tokenizer, out, info, measured, max_new_tokens())


def main(argv: list[str] | None = None) -> None:
    """Command line of the module docstring; prints ``warm_start.json`` as a JSON line."""
    from k15_plugin.data.arithmetic import DEMO_MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_MODELS.get("tiny_demo_chain"))
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--target", type=float, default=TARGET_ACCURACY)
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = MAX_POSITIONS
    train_ds, heldout = make_chain_datasets(seed=args.seed)
    check_rows, _ = make_chain_datasets(num_train=CHECK_SIZE, seed=args.seed + 1000, heldout_size=7)
    prompts = list(train_ds["prompt"])
    model = build_model(tokenizer, num_layers=args.layers, seed=args.seed, max_position_embeddings=MAX_POSITIONS)
    steps, seconds, checks = train(model, tokenizer, prompts, check_rows, args)
    info = {
        "task": "chained addition a1+...+ak=, k in 2..8, two-digit terms (k15_plugin.data.chain)",
        "formats": MIX,
        "seed": args.seed,
        "layers": args.layers,
        "batch_size": BATCH,
        "lr": args.lr,
        "target_accuracy": args.target,
        "steps": steps,
        "seconds": round(seconds, 1),
        "threads": args.threads,
        "checks": checks,
    }
    print(json.dumps(save(model, tokenizer, args.out, info, heldout)), flush=True)


if __name__ == "__main__":
    main()
