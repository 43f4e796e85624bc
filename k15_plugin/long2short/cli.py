"""``k15-long2short``: turn a long-CoT model into one that answers in fewer tokens (paper section 2.4).

    k15-long2short merge     --long L --short S --output DIR [--weight-long 0.5] [--method linear]
    k15-long2short sample    --model L (--task T | --input rows.jsonl) --output samples.jsonl [--n 8]
    k15-long2short build-sft --samples samples.jsonl --output sft.jsonl [--select shortest]
    k15-long2short build-dpo --samples samples.jsonl --output pairs.jsonl [--ratio 1.5] [--rule paper]
    k15-long2short sft       --model L --data sft.jsonl --output DIR
    k15-long2short dpo       --model L --data pairs.jsonl --output DIR [--loss sigmoid]
    k15-long2short eval      --models long=L rs=DIR ... (--task T | --input held_out.jsonl) --output eval.jsonl
    k15-long2short report    --eval eval.jsonl --reference long --output report.md [--plot fig.png]

The fourth method, long2short RL, is a second ``k15-train`` run from the long model with the length penalty on and a
shorter maximum completion length (``k15-train experiment=long2short_rl``). Models are Hugging Face directories (or
the shipped demo models by name: ``tiny_demo_sum3_long``, ``tiny_demo_sum3_short``); data is JSONL. Every command
prints one JSON summary line; a bad option or input file is one line on stderr and exit code 2; a rerun after an
interruption resumes (sample and eval from their sidecar, sft and dpo from their last checkpoint), and a rerun of a
finished job does nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from k15_plugin.core.long2short import DPO_RULES
from k15_plugin.jobs import add_generation_arguments
from k15_plugin.long2short.data import BUILTIN_TASKS, Long2ShortError
from k15_plugin.rewards.registry import VERIFIERS


def _prompts_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help=f"a built-in task: {', '.join(BUILTIN_TASKS)}")
    source.add_argument("--input", help="JSONL rows with prompt and answer (code: tests)")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts only")
    p.add_argument(
        "--reward",
        choices=list(VERIFIERS),
        default="task",
        help="task: the built-in task's checker, or answer match with --extraction for --input rows; "
        "math: math-verify; code: the sandbox over the rows' tests",
    )
    p.add_argument("--extraction", default=None, help="answer extraction for task/math (boxed, gsm8k, last_number)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (built-in tasks: their own)")
    p.add_argument("--temperature", type=float, default=1.0)
    add_generation_arguments(p, 256, "sequences per generate call")
    p.add_argument("--restart", action="store_true", help="discard the progress of an earlier, different job")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _finetune_args(p: argparse.ArgumentParser, lr: float) -> None:
    p.add_argument("--model", required=True, help="the model to fine-tune (the long model)")
    p.add_argument("--data", required=True, help="JSONL from build-sft / build-dpo")
    p.add_argument("--output", required=True, help="directory for the fine-tuned model")
    p.add_argument("--learning-rate", type=float, default=lr)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64, help="per-device batch size")
    p.add_argument("--max-length", type=int, default=1024, help="longest prompt + answer in tokens (longer: error)")
    p.add_argument("--save-steps", type=int, default=50, help="checkpoint interval, for resuming")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other field of TRL's SFTConfig / DPOConfig (repeatable), e.g. --set bf16=true",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an output written by another job")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The ``k15-long2short`` argument parser: one subcommand per command of the module docstring."""
    parser = argparse.ArgumentParser(
        prog="k15-long2short",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("merge", help="average a long and a short model (mergekit)")
    p.add_argument("--long", required=True)
    p.add_argument("--short", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--weight-long", type=float, default=0.5, help="the long model's weight (paper: 0.5)")
    p.add_argument("--method", choices=["linear", "task_arithmetic", "ties"], default="linear")
    p.add_argument("--base", default=None, help="common ancestor (task_arithmetic, ties)")
    p.add_argument("--overwrite", action="store_true", help="replace an output written by another job")

    p = commands.add_parser("sample", help="n scored samples per prompt")
    p.add_argument("--model", required=True)
    p.add_argument("--output", required=True, help="JSONL: each input row plus its samples")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (paper: 8)")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="process at most N more prompts, then stop; rerun to continue",
    )
    _prompts_args(p)

    p = commands.add_parser("build-sft", help="shortest correct sample per prompt, as SFT rows")
    p.add_argument("--samples", required=True)
    p.add_argument("--output", required=True)
    p.add_argument(
        "--select",
        choices=["shortest", "random"],
        default="shortest",
        help="shortest (the paper) or a random correct sample (the control)",
    )
    p.add_argument("--seed", type=int, default=0)

    p = commands.add_parser("build-dpo", help="preference pairs: shortest correct vs longer wrong or 1.5x longer")
    p.add_argument("--samples", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--ratio", type=float, default=1.5, help="a correct sample this many times longer is a negative")
    p.add_argument(
        "--rule",
        choices=list(DPO_RULES),
        default="paper",
        help="paper: wrong samples longer than the chosen one and correct ones --ratio times longer are negatives; "
        "any_wrong: every wrong sample, shorter ones too (a variant to compare, not the paper's)",
    )
    p.add_argument("--pairs-per-prompt", default="1", help="negatives drawn per prompt, or 'all'")
    p.add_argument("--seed", type=int, default=0)

    p = commands.add_parser("sft", help="fine-tune on SFT rows (TRL SFTTrainer)")
    _finetune_args(p, lr=1e-4)

    p = commands.add_parser("dpo", help="train on preference pairs (TRL DPOTrainer)")
    _finetune_args(p, lr=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument(
        "--loss",
        default="sigmoid",
        help="DPOConfig.loss_type terms, comma-separated, equal weights (sigmoid, the default: plain DPO, the "
        "paper's; sigmoid,sft adds the chosen answer's likelihood, which the paper does not)",
    )

    p = commands.add_parser("eval", help="accuracy and mean tokens, greedy and sampled, of several models")
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=PATH")
    p.add_argument("--output", required=True, help="JSONL, one row per model")
    p.add_argument("--sampled", type=int, default=4, help="samples per prompt for the sampled metric (0: greedy only)")
    _prompts_args(p)

    p = commands.add_parser("report", help="table and Fig. 7-style plot from an eval file")
    p.add_argument("--eval", required=True)
    p.add_argument("--reference", required=True, help="the model the deltas are against (the long model)")
    p.add_argument("--output", required=True, help="markdown file")
    p.add_argument("--plot", default=None, help="PNG file")
    return parser


def _pairs_per_prompt(value: str) -> int | None:
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise Long2ShortError(f"--pairs-per-prompt {value}: expected an integer or 'all'") from None


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one command; returns its summary."""
    args = build_parser().parse_args(argv)
    c = args.command
    if c == "merge":
        from k15_plugin.long2short.merge import merge

        return merge(
            args.long,
            args.short,
            args.output,
            weight_long=args.weight_long,
            method=args.method,
            base=args.base,
            overwrite=args.overwrite,
        )
    if c in ("sample", "eval"):
        from k15_plugin.long2short import sampling
        from k15_plugin.long2short.data import task_prompts

        need = ("prompt", "tests") if args.reward == "code" else ("prompt", "answer")
        split = "train" if c == "sample" else "heldout"
        prompts = task_prompts(args.task, args.input, split, args.num_prompts, args.seed, need)
        common = {
            "temperature": args.temperature,
            "max_new_tokens": args.max_new_tokens,
            "reward": args.reward,
            "extraction": args.extraction,
            "backend": args.backend,
            "batch_size": args.batch_size,
            "chat": args.chat,
            "seed": args.seed,
            "restart": args.restart,
            "progress": not args.quiet,
        }
        if c == "sample":
            if args.stop_after is not None and args.stop_after < 0:
                raise Long2ShortError("--stop-after must be >= 0")
            return sampling.sample(args.model, prompts, args.output, n=args.n, stop_after=args.stop_after, **common)
        if args.sampled < 0:
            raise Long2ShortError(f"--sampled must be >= 0, got {args.sampled}")
        return sampling.evaluate(
            sampling.parse_models(args.models), prompts, args.output, sampled=args.sampled, **common
        )
    if c in ("build-sft", "build-dpo"):
        from pathlib import Path

        from k15_plugin.jobs import write_atomically
        from k15_plugin.long2short.data import read_jsonl, require_columns
        from k15_plugin.long2short.rows import dpo_rows, sft_rows

        rows = read_jsonl(args.samples, "--samples")
        require_columns(rows, args.samples, ("prompt", "samples"))
        if c == "build-sft":
            out, stats = sft_rows(rows, args.samples, args.select, args.seed)
        else:
            out, stats = dpo_rows(
                rows, args.samples, args.ratio, _pairs_per_prompt(args.pairs_per_prompt), args.seed, args.rule
            )
        if not out:
            raise Long2ShortError(
                f"--samples {args.samples}: no prompt has a correct sample"
                + ("" if c == "build-sft" else " with a negative")
                + "; nothing to write"
            )
        write_atomically(Path(args.output), out)
        return {"command": c, "output": args.output, **stats}
    if c in ("sft", "dpo"):
        from k15_plugin.long2short.train import finetune

        extra = {"beta": args.beta, "loss": args.loss} if c == "dpo" else {}
        return finetune(
            c,
            args.model,
            args.data,
            args.output,
            learning_rate=args.learning_rate,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            max_length=args.max_length,
            save_steps=args.save_steps,
            overrides=args.set,
            overwrite=args.overwrite,
            progress=not args.quiet,
            **extra,
        )
    from k15_plugin.long2short.sampling import report

    return report(args.eval, args.reference, args.output, args.plot)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: prints the summary as one JSON line (k15-curate's conventions)."""
    from k15_plugin.jobs import console_main

    console_main("k15-long2short", run, argv)


if __name__ == "__main__":
    main()
