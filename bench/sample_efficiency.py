"""Held-out accuracy per sample and per second: k1.5 mirror descent settings against GRPO, Dr. GRPO and RLOO.

    python -m bench.sample_efficiency                 # ~8-10 minutes on 2 cores (2 runs at a time)
    python -m bench.sample_efficiency --smoke         # seconds; what the test suite runs

Every run starts from the same warm-started demo checkpoint (~22 % held-out greedy accuracy) and gets the same sample
budget: `--rollouts` generation batches of 16 prompts x 8 samples (a setting with several optimizer steps per batch
takes that many more, smaller steps on the same samples). Greedy held-out accuracy on all 500 held-out prompts is
measured every `--eval-every` rollout batches. Writes results/sample_efficiency.md (table) and
.png (curves with min-max bands over seeds). Last line: one JSON object naming the best k1.5 setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from transformers import TrainerCallback

from bench.common import RESULTS, build_trainer, demo_task, machine, run_jobs, samples_to_target, write_json_line

# name -> (algorithm, trainer overrides). Every setting sees rollout batches of 16 prompts x 8 samples. "2 passes"
# takes two optimizer steps on the whole batch (num_iterations=2, k15-train's kimi_md default: the paper's several
# steps per iteration against pi_i); "4 steps" splits the batch into 4 micro-batches of 32, one step each; "1 step"
# trains once on the whole batch (the earlier default, where the optimizer reset makes every k1.5 update Adam's first
# step, lr * sign(g), and tau does nothing).
FOUR_STEPS = {"per_device_train_batch_size": 32, "steps_per_generation": 4}
SETTINGS = {
    "k15 tau=1, 2 passes (default)": ("kimi_md", {"tau": 1.0, "num_iterations": 2}),
    "k15 tau=1, 4 steps": ("kimi_md", {"tau": 1.0, **FOUR_STEPS}),
    "k15 tau=1, 1 step": ("kimi_md", {"tau": 1.0}),
    "grpo, 2 passes": ("grpo", {"num_iterations": 2}),
    "grpo, 1 step": ("grpo", {}),
}
SAMPLES_PER_ROLLOUT = 128


class HeldOutCurve(TrainerCallback):
    def __init__(self, evaluate, every_steps: int, start: float):
        self.evaluate, self.every, self.start = evaluate, every_steps, start
        self.points: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self.points.append(
                {"step": state.global_step, "seconds": time.time() - self.start, "accuracy": self.evaluate(model)}
            )


def one_run(name: str, seed: int, rollouts: int, eval_every: int) -> dict:
    """Train one setting with one seed; returns its curve (samples, seconds, accuracy)."""
    from k15_plugin.data.arithmetic import evaluate_greedy

    torch.set_num_threads(1)
    algorithm, overrides = SETTINGS[name]
    model, tokenizer, train, heldout, rewards = demo_task(seed)
    updates = overrides.get("num_iterations", 1) * overrides.get("steps_per_generation", 1)  # optimizer steps/rollout

    def evaluate(m):  # all 500 held-out prompts every time (0.1 s): a subset would be a different, biased curve
        return evaluate_greedy(m, tokenizer, heldout)["accuracy"]

    start = time.time()
    curve = HeldOutCurve(evaluate, eval_every * updates, start)
    curve.points.append({"step": 0, "seconds": 0.0, "accuracy": evaluate(model)})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(
            algorithm,
            model,
            tokenizer,
            train,
            rewards,
            tmp,
            callbacks=[curve],
            seed=seed,
            max_steps=rollouts * updates,
            logging_steps=rollouts * updates,
            **overrides,
        )
        trainer.train()
    seconds = time.time() - start
    final = evaluate(trainer.model)
    curve.points.append({"step": rollouts * updates, "seconds": seconds, "accuracy": final})
    for p in curve.points:
        p["samples"] = p["step"] // updates * SAMPLES_PER_ROLLOUT
    return {"name": name, "seed": seed, "final_accuracy": final, "seconds": seconds, "curve": curve.points}


def _plot(runs: list[dict], names: list[str], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for name in names:
        mine = [r for r in runs if r["name"] == name]
        for ax, x_key in zip(axes, ("samples", "seconds"), strict=True):
            xs = [statistics.mean(p[x_key] for p in pts) for pts in zip(*(r["curve"] for r in mine), strict=True)]
            accs = list(zip(*([p["accuracy"] for p in r["curve"]] for r in mine), strict=True))
            mean = [statistics.mean(a) for a in accs]
            ax.plot(xs, mean, label=name, ls="-" if name.startswith("k15") else "--")
            ax.fill_between(xs, [min(a) for a in accs], [max(a) for a in accs], alpha=0.15)
    for ax, label in zip(axes, ("samples", "wall seconds"), strict=True):
        ax.set_xlabel(label)
        ax.set_ylabel("held-out greedy accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=200, help="generation batches per run (the sample budget)")
    parser.add_argument("--eval-every", type=int, default=20, help="rollout batches between held-out evaluations")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.35, help="accuracy for the samples-to-target column")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="runs at a time, each in its own process (0: one after another in this process)",
    )
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="the settings to run (default: all)")
    parser.add_argument("--smoke", action="store_true", help="2 settings, 1 seed, 2 rollouts: checks the plumbing")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting in this process
    cli = parser.parse_args()
    if cli.one:
        print(json.dumps(one_run(*json.loads(cli.one))))
        return
    torch.set_num_threads(1)
    names = cli.settings or list(SETTINGS)
    if cli.smoke:
        names, cli.seeds, cli.rollouts, cli.eval_every = ["k15 tau=1, 2 passes (default)", "grpo, 1 step"], 1, 2, 1
        cli.workers = 0  # no new processes: the test suite runs this in its own
    jobs = [[n, s, cli.rollouts, cli.eval_every] for s in range(cli.seeds) for n in names]
    runs = run_jobs("bench.sample_efficiency", one_run, jobs, cli.workers)

    rows = []
    for name in names:
        mine = [r for r in runs if r["name"] == name]
        finals = [r["final_accuracy"] for r in mine]
        reached = [samples_to_target(r, cli.target) for r in mine]
        rows.append(
            {
                "name": name,
                "final_mean": statistics.mean(finals),
                "final_min": min(finals),
                "final_max": max(finals),
                "seconds": statistics.mean(r["seconds"] for r in mine),
                "samples_to_target": statistics.mean(reached) if all(x is not None for x in reached) else None,
                "reached": sum(x is not None for x in reached),
            }
        )
    header = f"| setting | final acc (mean, min-max over {cli.seeds} seeds) | wall s | samples to {cli.target:.0%} |"
    lines = [header, "|---|---|---|---|"]
    for r in rows:
        target = (
            f"{r['samples_to_target']:.0f}"
            if r["samples_to_target"] is not None
            else f"{r['reached']}/{cli.seeds} reached"
        )
        lines.append(
            f"| {r['name']} | {r['final_mean']:.3f} ({r['final_min']:.3f}-{r['final_max']:.3f}) | "
            f"{r['seconds']:.0f} | {target} |"
        )
    table = "\n".join(lines)
    print(table)
    if not cli.smoke:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "sample_efficiency.md").write_text(
            f"# sample_efficiency ({time.strftime('%Y-%m-%d')}, {machine()}, {cli.workers} runs at a time)\n\n"
            f"Budget: {cli.rollouts} rollout batches x {SAMPLES_PER_ROLLOUT} samples per run; held-out greedy "
            f"accuracy on 500 prompts at the end.\n\n{table}\n"
        )
        _plot(runs, names, RESULTS / "sample_efficiency.png")
    k15 = max((r for r in rows if r["name"].startswith("k15")), key=lambda r: r["final_mean"])
    grpo = max((r for r in rows if r["name"].startswith("grpo")), key=lambda r: r["final_mean"])
    write_json_line(
        {
            "bench": "sample_efficiency",
            "k15_setting": k15["name"],
            "grpo_setting": grpo["name"],
            "k15_final_acc": round(k15["final_mean"], 4),
            "grpo_final_acc": round(grpo["final_mean"], 4),
            "k15_samples_to_target": k15["samples_to_target"],
            "grpo_samples_to_target": grpo["samples_to_target"],
            "target": cli.target,
            "seeds": cli.seeds,
        },
        save=not cli.smoke,
    )


if __name__ == "__main__":
    main()
