"""Build a long-CoT and a short-CoT model of the chained-addition task (``k15_plugin.data.chain``) for long2short.

    python -m k15_plugin.data.build.make_chain_long2short_checkpoints --out-long DIR --out-short DIR

Both start from the shipped ``tiny_demo_chain`` (supervised on a mix of the task's three formats and stopped early),
the way the three-term task's pair (``make_sum3_checkpoints``) starts from one model:

1. **long**: ``tiny_demo_chain`` fine-tuned by teacher forcing for :data:`LONG_STEPS` steps on ``prompt completion
   EOS`` rows whose format is drawn per row from :data:`LONG_MIX`, mostly ``verbose`` (the rest of the sum restated
   after each addition: 10 tokens at k = 2, 115 at k = 8), so it answers at length, more accurately than in the
   shorter formats, and its samples still vary in format and length;
2. **short**: the long model fine-tuned for :data:`SHORT_STEPS` steps on :data:`SHORT_MIX` (running sums, some direct
   answers): a short-CoT model of the same ancestry, the partner of the paper's merge. 100 steps are enough to switch
   its format (none of its samples restates the sum).

Measured on a first build (one thread, 140 held-out chains, 20 per k): the long model is right 0.84 of the time
greedily at 54.6 tokens, 0.55 sampled at 45.2 (restated answers are 66 % of its samples and right 70 % of the time,
running sums 23 % and 31 %, direct answers 11 % and 19 %); the short model 0.84 greedily at 24.5 tokens, 0.54 sampled
at 21.2. Running sums are as good a chain of thought for this model as the restatement once it is trained for them, so
on this task a method that drops the restatement loses nothing: long2short has a target at about 0.45 of the long
model's tokens, unlike on the three-term task, whose short model answers directly and loses most of the accuracy.

Fine-tuning a few hundred steps from the shipped model is the cheapest way to a long/short pair: training a chain model
from scratch takes ~900 steps before its accuracy rises at all (``make_chain_checkpoint``). AdamW (betas 0.9/0.98,
weight decay 0.01), batches of :data:`BATCH` training chains, a linear warm-up over a tenth of the steps then cosine
decay. Seeded and deterministic for a given seed, thread count and machine.

The models are not shipped: ``python -m bench.long2short --task demo_chain`` builds them into its work directory once
and reuses them while their recipe (``warm_start.json``'s ``recipe``) is unchanged. Each directory's
``warm_start.json`` records the recipe, the time it took and, measured on the saved model, greedy held-out accuracy
and tokens (overall and per k) and the sampled formats' shares and accuracies (``make_chain_checkpoint.measure``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from k15_plugin.data.arithmetic import DEMO_MODELS, WARM_START_FILE, load_demo_checkpoint
from k15_plugin.data.build.make_chain_checkpoint import measure
from k15_plugin.data.build.warm_start import finetune_on_formats, save_measured
from k15_plugin.data.chain import completion, make_chain_datasets, max_new_tokens, parse_prompt

INIT = "tiny_demo_chain"
SEED = 0
BATCH = 64
LONG_MIX = {"verbose": 0.7, "steps": 0.2, "direct": 0.1}
LONG_STEPS, LONG_LR = 300, 1e-3
SHORT_MIX = {"steps": 0.8, "direct": 0.2}
SHORT_STEPS, SHORT_LR = 100, 1e-3
MEASURE_SIZE = 140  # held-out chains measured for warm_start.json (20 per k)
MEASURE_SAMPLES = 4  # sampled completions per measured chain


def finetune(model, tokenizer, prompts: list[str], mix: dict[str, float], steps: int, lr: float, seed: int) -> float:
    """Teacher forcing on ``prompt completion(format ~ mix) EOS`` for ``steps`` batches of :data:`BATCH` prompts
    drawn from ``prompts`` (:func:`finetune_on_formats`); returns the seconds it took."""
    return finetune_on_formats(
        model,
        tokenizer,
        prompts,
        mix,
        lambda p, fmt: completion(parse_prompt(p), fmt),
        steps=steps,
        lr=lr,
        seed=seed,
        batch=BATCH,
    )


def recipe(seed: int = SEED, long_steps: int = LONG_STEPS, short_steps: int = SHORT_STEPS) -> dict:
    """What determines the pair (with the thread count and the machine): compared to reuse a finished build."""
    return {
        "init": INIT,
        "seed": seed,
        "batch_size": BATCH,
        "long": {"formats": LONG_MIX, "steps": long_steps, "lr": LONG_LR},
        "short": {"formats": SHORT_MIX, "steps": short_steps, "lr": SHORT_LR},
    }


def _first_per_k(heldout, size: int):
    """The first ``size / (number of k)`` rows of each k of the held-out set (at least one each)."""
    ks = heldout["difficulty"]
    per_k = max(1, size // len(set(ks)))
    seen: dict[int, int] = {}
    keep = []
    for i, k in enumerate(ks):
        seen[k] = seen.get(k, 0) + 1
        if seen[k] <= per_k:
            keep.append(i)
    return heldout.select(keep)


def _built(out: Path, want: dict) -> dict | None:
    path = out / WARM_START_FILE
    if not (out / "config.json").is_file() or not path.is_file():
        return None
    info = json.loads(path.read_text())
    return info if info.get("recipe") == want else None


def build(
    out_long: Path,
    out_short: Path,
    seed: int = SEED,
    long_steps: int = LONG_STEPS,
    short_steps: int = SHORT_STEPS,
    measure_size: int = MEASURE_SIZE,
) -> dict:
    """Train and save the long model into ``out_long``, then the short one into ``out_short``; returns
    ``{"long": info, "short": info}`` (what each ``warm_start.json`` holds, plus ``"reused"``).

    A pair already there with the same :func:`recipe` is reused as it is (nothing is trained). ``measure_size``:
    held-out chains measured for ``warm_start.json`` (the first of each k of the task's held-out set, the same
    number per k)."""
    out_long, out_short = Path(out_long), Path(out_short)
    want = recipe(seed, long_steps, short_steps)
    done = {"long": _built(out_long, want), "short": _built(out_short, want)}
    if done["long"] is not None and done["short"] is not None:
        return {**done, "reused": True}
    model, tokenizer = load_demo_checkpoint(DEMO_MODELS[INIT])
    train_ds, _ = make_chain_datasets(seed=seed)
    heldout = _first_per_k(make_chain_datasets(num_train=1)[1], measure_size)
    prompts = list(train_ds["prompt"])
    common = {
        "task": "chained addition a1+...+ak=, k in 2..8, two-digit terms (k15_plugin.data.chain)",
        "recipe": want,
        "threads": torch.get_num_threads(),
    }

    def measured(reloaded, reloaded_tok) -> dict:
        return {"heldout_size": len(heldout), "heldout": measure(reloaded, reloaded_tok, heldout, MEASURE_SAMPLES)}

    out: dict = {"reused": False}
    for name, target, mix, steps, lr, step_seed in (
        ("long", out_long, LONG_MIX, long_steps, LONG_LR, seed),
        ("short", out_short, SHORT_MIX, short_steps, SHORT_LR, seed + 1),
    ):
        seconds = finetune(model, tokenizer, prompts, mix, steps, lr, step_seed)
        info = {**common, "init_from": INIT if name == "long" else "long", "seconds": round(seconds, 1)}
        out[name] = save_measured(model, tokenizer, target, info, measured, max_new_tokens())
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line of the module docstring; prints ``{"long": ..., "short": ...}`` as a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-long", type=Path, required=True)
    parser.add_argument("--out-short", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--long-steps", type=int, default=LONG_STEPS)
    parser.add_argument("--short-steps", type=int, default=SHORT_STEPS)
    parser.add_argument("--measure-size", type=int, default=MEASURE_SIZE, help="held-out chains measured")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = build(args.out_long, args.out_short, args.seed, args.long_steps, args.short_steps, args.measure_size)
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
