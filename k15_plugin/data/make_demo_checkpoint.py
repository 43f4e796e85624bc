"""Build the shipped warm-started demo checkpoint(s).

    python -m k15_plugin.data.make_demo_checkpoint                  # -> k15_plugin/data/demo_checkpoint/
    python -m k15_plugin.data.make_demo_checkpoint --filler-max 6   # -> k15_plugin/data/demo_checkpoint_filler/

Builds the character tokenizer and the ~527k-parameter Llama, warm-starts it with teacher forcing until the
held-out greedy accuracy reaches ``--target-accuracy`` (checked every 25 steps), and saves the model (safetensors),
the tokenizer and ``warm_start.json`` (the measured numbers, re-checked by the tests). The target is deliberately low
(22% by default, 30% for the filler variant) so that RL has room to improve. Runs in well under a minute on one CPU
thread; the result is deterministic for a given seed on a given machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
from pathlib import Path

import torch

from k15_plugin.data.arithmetic import (
    DEMO_CHECKPOINT_DIR,
    DEMO_FILLER_CHECKPOINT_DIR,
    WARM_START_FILE,
    build_model,
    build_tokenizer,
    evaluate_greedy,
    load_demo_checkpoint,
    make_datasets,
    supervised_warm_start,
)

# The seed of the shipped checkpoints. How far RL gets depends on the warm-started checkpoint, not only on its
# accuracy: with plain TRL GRPO (16 prompts x 8 samples, lr 1e-4, 1200 steps) seeds 0/1/2 went 34.6->62.8%,
# 26.2->48.6% and 24.4->67.8% held-out greedy accuracy. Seed 2 ships: closest to the target and most headroom used.
DEFAULT_SEED = 2


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def build_checkpoint(
    out: Path,
    *,
    filler_max: int = 0,
    target_accuracy: float = 0.22,
    max_steps: int = 600,
    check_every: int = 5,
    seed: int = DEFAULT_SEED,
    threads: int = 1,
) -> dict:
    """Warm-start a fresh demo model and save it to ``out``; returns what is written to ``warm_start.json``."""
    torch.set_num_threads(threads)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    train_ds, heldout_ds = make_datasets(seed=seed)
    result = supervised_warm_start(
        model,
        tokenizer,
        train_ds,
        heldout_ds,
        target_accuracy=target_accuracy,
        max_steps=max_steps,
        check_every=check_every,
        seed=seed,
        filler_max=filler_max,
    )
    if not result["reached_target"]:
        raise RuntimeError(f"warm start stopped at {result['accuracy']:.3f} < target {target_accuracy} accuracy")

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # A filler answer takes up to filler_max more tokens than the longest plain one (3 digits + EOS).
    model.generation_config.max_new_tokens = 4 + filler_max
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    # Re-measure from the saved files, so the recorded number is what a user of the checkpoint gets.
    reloaded, reloaded_tok = load_demo_checkpoint(out)
    check = evaluate_greedy(reloaded, reloaded_tok, heldout_ds, allow_filler=filler_max > 0)
    info = {
        "task": "two-digit addition a+b=, a,b in 0..99",
        "filler_max": filler_max,
        "allow_filler": filler_max > 0,
        "seed": seed,
        "target_accuracy": target_accuracy,
        "check_every": check_every,
        "steps": result["steps"],
        "seconds": round(result["seconds"], 2),
        "threads": threads,
        "heldout_size": len(heldout_ds),
        "heldout_accuracy": check["accuracy"],
        "heldout_mean_completion_tokens": round(check["mean_completion_tokens"], 4),
        "history": [[s, a] for s, a in result["history"]],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "optimizer": {
            "name": "AdamW",
            "lr": 3e-3,
            "betas": [0.9, 0.98],
            "weight_decay": 0.01,
            "batch_size": 256,
            "warmup_steps": 60,
            "schedule": f"cosine over {max_steps} steps",
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    (out / WARM_START_FILE).write_text(json.dumps(info, indent=2) + "\n")
    # safetensors writes the weights owner-only (0600); shipped package data must be world-readable.
    for f in out.iterdir():
        f.chmod(0o644)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the shipped location)")
    parser.add_argument("--filler-max", type=int, default=0, help="max '.' filler tokens before the answer (0: none)")
    parser.add_argument(
        "--target-accuracy", type=float, default=None, help="stop threshold (default 0.22; 0.30 with filler)"
    )
    parser.add_argument("--max-steps", type=int, default=600)
    # Accuracy jumps ~15 points per 25 steps near the target; checking often (a greedy pass costs ~0.1 s) lands the
    # checkpoint close to the threshold instead of overshooting it.
    parser.add_argument("--check-every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    out = args.out or (DEMO_FILLER_CHECKPOINT_DIR if args.filler_max > 0 else DEMO_CHECKPOINT_DIR)
    target = args.target_accuracy if args.target_accuracy is not None else (0.30 if args.filler_max > 0 else 0.22)
    info = build_checkpoint(
        out,
        filler_max=args.filler_max,
        target_accuracy=target,
        max_steps=args.max_steps,
        check_every=args.check_every,
        seed=args.seed,
        threads=args.threads,
    )
    size_kb = sum(f.stat().st_size for f in out.iterdir()) / 1024
    print(
        f"saved {out} ({size_kb:.0f} KiB): {info['steps']} steps, {info['seconds']:.1f}s, "
        f"heldout greedy accuracy {info['heldout_accuracy']:.3f}, peak RSS {info['peak_rss_mb']:.0f} MB"
    )


if __name__ == "__main__":
    main()
