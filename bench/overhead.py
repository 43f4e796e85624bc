"""Per-step cost of KimiMirrorDescentTrainer against TRL's GRPOTrainer on identical settings.

    python -m bench.overhead              # ~1-2 minutes on 2 cores
    python -m bench.overhead --smoke      # 4 steps: what the test suite runs

Time: both trainers live in one process and take turns, one optimizer step each (A B A B ...), through the real
TRL/transformers training loop (a callback hands a baton between two threads, only one of which runs at a time);
the first `--warmup` steps of each are dropped. Memory: each trainer runs alone in a fresh subprocess for the same
steps (the two processes at once) and reports its peak RSS. Last line:
{"bench": "overhead", "step_time_ratio_median": ..., "rss_ratio": ...}, k1.5 / GRPO.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
from transformers import TrainerCallback

from bench.common import build_trainer, demo_task, write_json_line

ALGORITHMS = ("kimi_md", "grpo")


class Baton(TrainerCallback):
    """Lets its trainer start a step only on its turn, times the step, then passes the turn on."""

    def __init__(self, mine: threading.Event, theirs: threading.Event):
        self.mine, self.theirs = mine, theirs
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.mine.wait()
        self.mine.clear()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)
        self.theirs.set()

    def on_train_end(self, args, state, control, **kwargs):
        self.theirs.set()  # never leave the other trainer waiting


def interleaved_times(steps: int, seed: int) -> dict[str, list[float]]:
    turns = {name: threading.Event() for name in ALGORITHMS}
    batons = {
        ALGORITHMS[0]: Baton(turns[ALGORITHMS[0]], turns[ALGORITHMS[1]]),
        ALGORITHMS[1]: Baton(turns[ALGORITHMS[1]], turns[ALGORITHMS[0]]),
    }
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ALGORITHMS:
            model, tokenizer, train, _, rewards = demo_task(seed)
            trainers[name] = build_trainer(
                name,
                model,
                tokenizer,
                train,
                rewards,
                f"{tmp}/{name}",
                callbacks=[batons[name]],
                max_steps=steps,
                seed=seed,
                logging_steps=steps,
            )
        threads = [threading.Thread(target=trainers[name].train) for name in ALGORITHMS]
        for t in threads:
            t.start()
        turns[ALGORITHMS[0]].set()
        for t in threads:
            t.join()
    return {name: batons[name].times for name in ALGORITHMS}


def peak_rss_mb(steps: int, seed: int) -> dict[str, float]:
    """Peak RSS of a fresh process per algorithm that trains it alone for ``steps`` steps (both run at once)."""
    started = {}
    for algorithm in ALGORITHMS:
        code = (
            "import resource, tempfile, torch; torch.set_num_threads(1);"
            "from bench.common import build_trainer, demo_task;"
            f"m, t, d, _, r = demo_task({seed});"
            "tmp = tempfile.mkdtemp();"
            f"build_trainer({algorithm!r}, m, t, d, r, tmp, max_steps={steps}, seed={seed}, logging_steps={steps})"
            ".train();"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
        )
        started[algorithm] = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    rss = {}
    for algorithm, process in started.items():
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"{algorithm}: {stderr[-2000:]}")
        rss[algorithm] = float(stdout.strip().splitlines()[-1])
    return rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per trainer (the first --warmup are dropped)")
    parser.add_argument("--warmup", type=int, default=5, help="steps of each trainer not timed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="4 steps, nothing saved: checks the plumbing")
    cli = parser.parse_args()
    if cli.smoke:
        cli.steps, cli.warmup = 4, 1
    torch.set_num_threads(1)
    warmup = min(cli.warmup, cli.steps - 1)

    times = {k: v[warmup:] for k, v in interleaved_times(cli.steps, cli.seed).items()}
    rss = peak_rss_mb(cli.steps, cli.seed)
    ratios = [a / b for a, b in zip(times["kimi_md"], times["grpo"], strict=True)]  # pairwise: neighbours in time

    print(f"{'trainer':<10} {'steps':>5} {'median step s':>14} {'mean step s':>12} {'peak RSS MB':>12}")
    for name in ALGORITHMS:
        print(
            f"{name:<10} {len(times[name]):>5} {statistics.median(times[name]):>14.4f} "
            f"{statistics.mean(times[name]):>12.4f} {rss[name]:>12.0f}"
        )
    print(f"median of pairwise step-time ratios (k1.5 / GRPO): {statistics.median(ratios):.3f}")
    write_json_line(
        {
            "bench": "overhead",
            "step_time_ratio_median": round(statistics.median(ratios), 4),
            "rss_ratio": round(rss["kimi_md"] / rss["grpo"], 4),
            "steps_timed": len(ratios),
            "median_step_seconds": {k: round(statistics.median(v), 5) for k, v in times.items()},
            "peak_rss_mb": {k: round(v, 1) for k, v in rss.items()},
        },
        save=not cli.smoke,
    )


if __name__ == "__main__":
    main()
