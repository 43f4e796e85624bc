"""Build the shipped warm-started demo checkpoint(s).

    python -m k15_plugin.data.build.make_demo_checkpoint                         # -> k15_plugin/data/demo_checkpoint/
    python -m k15_plugin.data.build.make_demo_checkpoint --filler-max 6          # -> .../demo_checkpoint_filler/
    python -m k15_plugin.data.build.make_demo_checkpoint --filler-dist longtail  # -> .../demo_checkpoint_longtail/

Builds the character tokenizer and the ~527k-parameter Llama, warm-starts it with teacher forcing until the
held-out greedy accuracy reaches ``--target-accuracy`` (checked every ``--check-every`` steps), and saves the model
(safetensors), the tokenizer and ``warm_start.json`` (the measured numbers, re-checked by the tests). The target is
deliberately low (22% by default, 30% for the filler and long-tailed variants) so that RL has room to improve. The
plain and filler variants take one to two minutes on one CPU thread. The long-tailed variant is a fine-tune of the
shipped filler checkpoint (build that first) on the long-tailed filler mixture, at least 100 steps, checked every 20
(sequences up to 67 tokens, greedy checks of up to 64 new tokens); ``--snapshot PATH`` lets an interrupted build
resume. The result is deterministic for a given seed on a given machine.

The long-tailed variant (``--filler-dist longtail``; see ``k15_plugin.data.arithmetic``) has
``max_position_embeddings=128``, ``generation_config.max_new_tokens=64``, and records in ``warm_start.json`` the
``sampled_lengths`` of 8 temperature-1 completions per held-out prompt (fraction of completions of 40+ tokens, mean
length, fraction of groups with a long completion, fraction truncated at 64 tokens without EOS).
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
from transformers import LlamaConfig, LlamaForCausalLM

from k15_plugin.data.arithmetic import (
    DEMO_CHECKPOINT_DIR,
    DEMO_FILLER_CHECKPOINT_DIR,
    DEMO_LONGTAIL_CHECKPOINT_DIR,
    FILLER_DISTS,
    LONGTAIL_LONG,
    LONGTAIL_MAX_NEW_TOKENS,
    LONGTAIL_MAX_POSITION_EMBEDDINGS,
    LONGTAIL_P_LONG,
    LONGTAIL_SHORT,
    WARM_START_FILE,
    evaluate_greedy,
    load_demo_checkpoint,
    make_datasets,
    sample_completion_lengths,
)
from k15_plugin.data.build.warm_start import build_model, build_tokenizer, supervised_warm_start

# The seed of the shipped checkpoints. How far RL gets depends on the warm-started checkpoint, not only on its
# accuracy: with plain TRL GRPO (16 prompts x 8 samples, lr 1e-4, 1200 steps) seeds 0/1/2 went 34.6->62.8%,
# 26.2->48.6% and 24.4->67.8% held-out greedy accuracy. Seed 2 ships: closest to the target and most headroom used.
DEFAULT_SEED = 2
# The warm start's optimizer settings (the plain and filler variants were built with these), and what the long-tailed
# fine-tune from the filler checkpoint changes: a smaller learning rate with a short warm-up, and at least
# ``min_steps`` steps before the accuracy check may stop it (the filler checkpoint starts above the target).
OPTIM = {"lr": 3e-3, "warmup_steps": 60, "min_steps": 0}
LONGTAIL_OPTIM = {"lr": 1e-3, "warmup_steps": 10, "min_steps": 100}


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def build_checkpoint(
    out: Path,
    *,
    filler_max: int = 0,
    filler_dist: str = "uniform",
    target_accuracy: float = 0.22,
    max_steps: int = 600,
    check_every: int = 5,
    seed: int = DEFAULT_SEED,
    threads: int = 1,
    snapshot: Path | None = None,
) -> dict:
    """Warm-start a fresh demo model and save it to ``out``; returns what is written to ``warm_start.json``.

    ``filler_dist="longtail"`` (with ``filler_max`` 0) builds the long-tailed variant: a 128-position model, 64 new
    tokens in its generation config, and ``sampled_lengths`` measured on the saved checkpoint. ``snapshot``: see
    :func:`~k15_plugin.data.build.warm_start.supervised_warm_start` (resume an interrupted build).
    """
    if filler_dist not in FILLER_DISTS:
        raise ValueError(f"filler_dist must be one of {FILLER_DISTS}, got {filler_dist!r}")
    longtail = filler_dist == "longtail"
    torch.set_num_threads(threads)
    tokenizer = build_tokenizer()
    positions = LONGTAIL_MAX_POSITION_EMBEDDINGS if longtail else 64
    train_ds, heldout_ds = make_datasets(seed=seed)
    if longtail:
        # Fine-tuned from the shipped filler checkpoint (it already adds, with 0..6 filler tokens): only the long
        # filler runs are new. RoPE has no position parameters, so its weights load into the 128-position model.
        # (The config is passed whole: a keyword argument to from_pretrained also lands in the generation config.)
        config = LlamaConfig.from_pretrained(DEMO_FILLER_CHECKPOINT_DIR, max_position_embeddings=positions)
        model = LlamaForCausalLM.from_pretrained(DEMO_FILLER_CHECKPOINT_DIR, config=config)
        optim = {**OPTIM, **LONGTAIL_OPTIM}
    else:
        model = build_model(tokenizer, seed=seed, max_position_embeddings=positions)
        optim = OPTIM
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
        filler_dist=filler_dist,
        snapshot=snapshot,
        **optim,
    )
    if not result["reached_target"]:
        raise RuntimeError(f"warm start stopped at {result['accuracy']:.3f} < target {target_accuracy} accuracy")

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # A filler answer takes up to filler_max more tokens than the longest plain one (3 digits + EOS); a long-tailed
    # one up to 56 more, within the 64 tokens its benchmark generates.
    model.generation_config.max_new_tokens = LONGTAIL_MAX_NEW_TOKENS if longtail else 4 + filler_max
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    # Re-measure from the saved files, so the recorded number is what a user of the checkpoint gets.
    reloaded, reloaded_tok = load_demo_checkpoint(out)
    allow_filler = filler_max > 0 or longtail
    check = evaluate_greedy(
        reloaded,
        reloaded_tok,
        heldout_ds,
        max_new_tokens=LONGTAIL_MAX_NEW_TOKENS if longtail else None,
        allow_filler=allow_filler,
    )
    info = {
        "task": "two-digit addition a+b=, a,b in 0..99",
        # The largest filler count the warm start drew.
        "filler_max": LONGTAIL_LONG[1] if longtail else filler_max,
        "allow_filler": allow_filler,
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
            "lr": optim["lr"],
            "betas": [0.9, 0.98],
            "weight_decay": 0.01,
            "batch_size": 256,
            "warmup_steps": optim["warmup_steps"],
            "schedule": f"cosine over {max_steps} steps",
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    if longtail:
        # Only the new variant records these keys, so a rebuild of the plain and filler variants writes what it did.
        info["init_from"] = DEMO_FILLER_CHECKPOINT_DIR.name
        info["min_steps"] = optim["min_steps"]
        info["filler_dist"] = filler_dist
        info["filler_mixture"] = {"p_long": LONGTAIL_P_LONG, "short": list(LONGTAIL_SHORT), "long": list(LONGTAIL_LONG)}
        info["heldout_greedy_max_new_tokens"] = LONGTAIL_MAX_NEW_TOKENS
        info["max_position_embeddings"] = reloaded.config.max_position_embeddings
        info["generation_max_new_tokens"] = reloaded.generation_config.max_new_tokens
        stats = sample_completion_lengths(reloaded, reloaded_tok, heldout_ds, seed=seed)
        info["sampled_lengths"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}
    info["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    (out / WARM_START_FILE).write_text(json.dumps(info, indent=2) + "\n")
    # safetensors writes the weights owner-only (0600); shipped package data must be world-readable.
    for f in out.iterdir():
        f.chmod(0o644)
    return info


def main(argv: list[str] | None = None) -> None:
    """Command line of the module docstring: build one checkpoint variant and print its steps, time and held-out
    greedy accuracy. A non-zero ``--filler-max`` with ``--filler-dist longtail`` is a usage error (exit code 2)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the shipped location)")
    parser.add_argument("--filler-max", type=int, default=0, help="max '.' filler tokens before the answer (0: none)")
    parser.add_argument(
        "--filler-dist",
        choices=FILLER_DISTS,
        default="uniform",
        help="filler count distribution: uniform in 0..--filler-max, or longtail (none w.p. 0.85, 40..56 w.p. 0.15; "
        "leave --filler-max at 0)",
    )
    parser.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        help="stop threshold (default 0.22; 0.30 with filler or longtail)",
    )
    # The long-tailed variant is a fine-tune of the filler checkpoint: a shorter cosine schedule, and checks (a greedy
    # pass of up to 64 tokens) only every 20 steps after its first 100.
    parser.add_argument("--max-steps", type=int, default=None, help="schedule length (default 600; 300 longtail)")
    # Accuracy jumps ~15 points per 25 steps near the target; checking often (a greedy pass costs ~0.1 s) lands the
    # checkpoint close to the threshold instead of overshooting it.
    parser.add_argument("--check-every", type=int, default=None, help="steps between checks (default 5; 20 longtail)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--snapshot",
        type=Path,
        default=None,
        help="save the training state to this file at every check and resume from it if it exists",
    )
    args = parser.parse_args(argv)

    longtail = args.filler_dist == "longtail"
    if longtail and args.filler_max != 0:
        parser.error("--filler-max applies to --filler-dist uniform only (the long-tailed mixture is fixed)")
    if longtail:
        default_out = DEMO_LONGTAIL_CHECKPOINT_DIR
    else:
        default_out = DEMO_FILLER_CHECKPOINT_DIR if args.filler_max > 0 else DEMO_CHECKPOINT_DIR
    out = args.out or default_out
    with_filler = longtail or args.filler_max > 0
    target = args.target_accuracy if args.target_accuracy is not None else (0.30 if with_filler else 0.22)
    info = build_checkpoint(
        out,
        filler_max=args.filler_max,
        filler_dist=args.filler_dist,
        target_accuracy=target,
        max_steps=args.max_steps if args.max_steps is not None else (300 if longtail else 600),
        check_every=args.check_every if args.check_every is not None else (20 if longtail else 5),
        seed=args.seed,
        threads=args.threads,
        snapshot=args.snapshot,
    )
    size_kb = sum(f.stat().st_size for f in out.iterdir()) / 1024
    print(
        f"saved {out} ({size_kb:.0f} KiB): {info['steps']} steps, {info['seconds']:.1f}s, "
        f"heldout greedy accuracy {info['heldout_accuracy']:.3f}, peak RSS {info['peak_rss_mb']:.0f} MB"
    )
    if "sampled_lengths" in info:
        print(f"sampled lengths: {json.dumps(info['sampled_lengths'])}")


if __name__ == "__main__":
    main()
