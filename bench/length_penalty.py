"""The k1.5 length penalty on a task whose answers can be padded: tokens and accuracy with and without it.

    python -m bench.length_penalty            # ~6-9 minutes on 2 cores (2 runs at a time)
    python -m bench.length_penalty --smoke    # seconds; what the test suite runs

The filler variant of the demo task: the warm-start data put 0-6 random "." tokens before the answer, so the
warm-started model (k15_plugin/data/demo_checkpoint_filler) emits answers of varying length, and the reward accepts
any filler before the right digits. k1.5 mirror descent trains it with the paper's length penalty (weight, after a
warm-up) and without, 3 seeds each, from the same checkpoint. Greedy held-out accuracy and mean completion tokens at
the end. Last line: {"bench": "length_penalty", "tokens_ratio": with/without, "accuracy_delta": with - without}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from bench.common import RESULTS, build_trainer, demo_task, machine, run_jobs, write_json_line

MAX_TOKENS = 10  # 3 digits + EOS + up to 6 filler tokens
# Logged every steps/20 steps: sampled accuracy, sampled length, the penalty's weight, the share of groups with no
# correct answer (they only see min(0, lambda), which favours the shortest wrong answer) and the penalty's mean.
HISTORY_KEYS = {
    "rewards/arithmetic_correct/mean": "acc",
    "completions/mean_length": "len",
    "length_penalty/weight": "w",
    "length_penalty/all_wrong_groups": "all_wrong",
    "rewards/length_penalty/mean": "lp",
}


def one_run(with_penalty: bool, seed: int, steps: int, weight: float, warmup: int, ramp: int) -> dict:
    from k15_plugin.data.arithmetic import evaluate_greedy

    torch.set_num_threads(1)
    model, tokenizer, train, heldout, rewards = demo_task(seed, filler=True)
    before = evaluate_greedy(model, tokenizer, heldout, allow_filler=True)
    penalty = {
        "length_penalty_weight": weight,
        "length_penalty_warmup_steps": warmup,
        "length_penalty_ramp_steps": ramp,
    }
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(
            "kimi_md",
            model,
            tokenizer,
            train,
            rewards,
            tmp,
            seed=seed,
            max_steps=steps,
            logging_steps=max(1, steps // 20),
            max_completion_length=MAX_TOKENS,
            **(penalty if with_penalty else {}),
        )
        trainer.train()
    after = evaluate_greedy(trainer.model, tokenizer, heldout, allow_filler=True)
    logged = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    history = [{"step": h["step"], **{v: round(h[k], 3) for k, v in HISTORY_KEYS.items() if k in h}} for h in logged]
    return {
        "with_penalty": with_penalty,
        "seed": seed,
        "seconds": time.time() - start,
        "before": before,
        "after": after,
        "history": history,
    }


def _trajectories(runs: list[dict]) -> str:
    """Sampled accuracy / length / share of all-wrong groups / penalty weight along each run, to see why it ends
    where it does."""
    out = ["## Trajectories (sampled, per logging step): acc / len / all-wrong groups / weight", ""]
    for r in runs:
        label = f"seed {r['seed']}, {'with' if r['with_penalty'] else 'without'} penalty"
        points = [
            f"{h['step']}: {h.get('acc', 0):.2f} / {h.get('len', 0):.1f} / {h.get('all_wrong', float('nan')):.2f}"
            f" / {h.get('w', 0):.2f}"
            for h in r["history"]
        ]
        out.append(f"- {label}: " + "; ".join(points))
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--weight", type=float, default=0.1, help="length_penalty_weight (0.5 collapsed, see README)")
    parser.add_argument("--warmup", type=int, default=200, help="length_penalty_warmup_steps (paper: a warm-up)")
    parser.add_argument("--ramp", type=int, default=100, help="length_penalty_ramp_steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="runs at a time, each in its own process (0: one after another in this process)",
    )
    parser.add_argument("--smoke", action="store_true", help="1 seed, 3 steps, nothing saved")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.one:
        print(json.dumps(one_run(*json.loads(cli.one))))
        return
    torch.set_num_threads(1)
    if cli.smoke:
        cli.seeds, cli.steps, cli.warmup, cli.ramp = 1, 3, 1, 0
        cli.workers = 0  # no new processes: the test suite runs this in its own

    jobs = [[p, s, cli.steps, cli.weight, cli.warmup, cli.ramp] for s in range(cli.seeds) for p in (False, True)]
    runs = run_jobs("bench.length_penalty", one_run, jobs, cli.workers)

    def mean(with_penalty, key):
        return statistics.mean(r["after"][key] for r in runs if r["with_penalty"] == with_penalty)

    start_acc = statistics.mean(r["before"]["accuracy"] for r in runs)
    start_tokens = statistics.mean(r["before"]["mean_completion_tokens"] for r in runs)
    lines = [
        "| run | held-out accuracy | mean completion tokens |",
        "|---|---|---|",
        f"| warm-started checkpoint | {start_acc:.3f} | {start_tokens:.2f} |",
    ]
    for with_penalty, label in ((False, "k1.5, no length penalty"), (True, "k1.5 + length penalty")):
        accs = [r["after"]["accuracy"] for r in runs if r["with_penalty"] == with_penalty]
        toks = [r["after"]["mean_completion_tokens"] for r in runs if r["with_penalty"] == with_penalty]
        lines.append(
            f"| {label} | {statistics.mean(accs):.3f} (per seed {', '.join(f'{a:.3f}' for a in accs)}) | "
            f"{statistics.mean(toks):.2f} (per seed {', '.join(f'{t:.2f}' for t in toks)}) |"
        )
    table = "\n".join(lines)
    print(table)
    if not cli.smoke:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "length_penalty.md").write_text(
            f"# length_penalty ({time.strftime('%Y-%m-%d')}, {machine()})\n\n{cli.steps} steps, weight {cli.weight}, "
            f"warm-up {cli.warmup}, ramp {cli.ramp}, {cli.seeds} seeds, greedy on 500 held-out prompts.\n\n{table}\n\n"
            + _trajectories(runs)
        )
    write_json_line(
        {
            "bench": "length_penalty",
            "tokens_ratio": round(mean(True, "mean_completion_tokens") / mean(False, "mean_completion_tokens"), 4),
            "accuracy_delta": round(mean(True, "accuracy") - mean(False, "accuracy"), 4),
            "steps": cli.steps,
            "weight": cli.weight,
            "warmup": cli.warmup,
            "ramp": cli.ramp,
            "seeds": cli.seeds,
        },
        save=not cli.smoke,
    )


if __name__ == "__main__":
    main()
