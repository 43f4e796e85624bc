"""k1.5 against GRPO on the image task: ``k15-train experiment=demo_vision`` with ``algorithm=kimi_md`` and ``grpo``.

    python -m bench.vision              # 3 paired seeds x 2 algorithms, 2 runs at a time
    python -m bench.vision --smoke      # 1 seed, 2 rollout batches each, nothing saved: what the suite runs

Each run is a real ``k15-train`` process (``experiment=demo_vision``: the shipped tiny LLaVA, "How many red
squares?" about 56x56 pictures drawn in code, 16 pictures x 8 samples per rollout batch, transformers generation),
scored on the 300 held-out pictures before and after. Both algorithms get the same sample budget: ``--rollouts``
rollout batches, so k1.5 (2 optimizer steps per rollout batch, ``kimi_md``'s ``num_iterations``) takes twice the
optimizer steps of GRPO (TRL's defaults through the plugin: 1 step per rollout batch). Seed s gives both the same
training pictures and the same start (paired).

Files: results/vision.md (the table), results/vision.json (the last line), results/vision_runs.jsonl (finished runs;
an interrupted benchmark resumes). Last line: {"bench": "vision", "k15_accuracy", "grpo_accuracy", "seeds",
"accuracy_before", "difference", "difference_stderr", "k15_accuracy_per_seed", "grpo_accuracy_per_seed", ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import RESULTS, run_jobs, write_json_line

ALGORITHMS = ("kimi_md", "grpo")
STEPS_PER_ROLLOUT = {"kimi_md": 2, "grpo": 1}  # each algorithm's optimizer steps per rollout batch in k15-train
ROLLOUTS, SEEDS = 400, 3  # rollout batches per run (the sample budget: x 128), paired seeds


def one_run(algorithm: str, seed: int, rollouts: int, smoke: bool = False) -> dict:
    """One ``k15-train experiment=demo_vision`` process; its summary's figures."""
    steps = rollouts * STEPS_PER_ROLLOUT[algorithm]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        args = [
            "experiment=demo_vision",
            f"algorithm={algorithm}",
            f"seed={seed}",
            f"trainer.max_steps={steps}",
            f"trainer.eval_steps={steps}",
            "trainer.save_final_model=false",
            f"hydra.run.dir={run_dir}",
        ]
        if smoke:
            args += ["trainer.eval_size=20", "data.heldout_size=30", "data.num_train=100"]
        out = subprocess.run(
            [sys.executable, "-m", "k15_plugin.cli.train", *args], cwd=tmp, capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"k15-train {' '.join(args)} failed:\n{out.stderr[-2000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "algorithm": algorithm,
        "seed": seed,
        "steps": steps,
        "rollouts": rollouts,
        "accuracy_before": summary["eval_accuracy_before"],
        "accuracy": summary["eval_accuracy_after"],
        "train_samples": summary["train_samples"],
        "wall_seconds": summary["wall_seconds"],
    }


def summarize(runs: list[dict]) -> dict:
    """Means over seeds and the paired (same-seed) difference k1.5 - GRPO with its standard error, as fractions."""
    by = {a: sorted((r for r in runs if r["algorithm"] == a), key=lambda r: r["seed"]) for a in ALGORITHMS}
    k15, grpo = ([r["accuracy"] for r in by[a]] for a in ALGORITHMS)
    gap = [x - y for x, y in zip(k15, grpo, strict=True)]
    stderr = statistics.stdev(gap) / math.sqrt(len(gap)) if len(gap) > 1 else None
    return {
        "k15_accuracy": round(statistics.mean(k15), 4),
        "grpo_accuracy": round(statistics.mean(grpo), 4),
        "seeds": len(gap),
        "accuracy_before": round(statistics.mean(r["accuracy_before"] for r in runs), 4),
        "difference": round(statistics.mean(gap), 4),
        "difference_stderr": None if stderr is None else round(stderr, 4),
        "k15_accuracy_per_seed": [round(x, 4) for x in k15],
        "grpo_accuracy_per_seed": [round(x, 4) for x in grpo],
        "train_samples": {a: by[a][0]["train_samples"] for a in ALGORITHMS},
        "optimizer_steps": {a: by[a][0]["steps"] for a in ALGORITHMS},
        "wall_seconds": {a: round(statistics.mean(r["wall_seconds"] for r in by[a]), 1) for a in ALGORITHMS},
    }


def table(result: dict) -> str:
    lines = [
        "| algorithm | held-out accuracy (before -> after), mean | per seed | optimizer steps | wall s (2 at a time) |",
        "|---|---|---|---|---|",
    ]
    for a, key in (("kimi_md", "k15"), ("grpo", "grpo")):
        per_seed = ", ".join(f"{x:.3f}" for x in result[f"{key}_accuracy_per_seed"])
        lines.append(
            f"| {a} | {result['accuracy_before']:.3f} -> {result[f'{key}_accuracy']:.3f} | {per_seed} | "
            f"{result['optimizer_steps'][a]} | {result['wall_seconds'][a]:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=ROLLOUTS, help="rollout batches per run (x 128 samples)")
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (accuracy only: nothing is timed)")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 2 rollout batches, nothing saved")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.one:
        print(json.dumps(one_run(*json.loads(cli.one))))
        return
    rollouts, seeds = (2, 1) if cli.smoke else (cli.rollouts, cli.seeds)
    jobs = [[a, seed, rollouts, cli.smoke] for seed in range(seeds) for a in ALGORITHMS]
    cache = None if cli.smoke else RESULTS / "vision_runs.jsonl"
    runs = run_jobs("bench.vision", one_run, jobs, 0 if cli.smoke else cli.workers, cache)
    result = summarize(runs)
    text = table(result)
    print(text)
    if not cli.smoke:
        (RESULTS / "vision.md").write_text(
            f"# k1.5 vs GRPO on demo_vision\n\n{rollouts} rollout batches x 128 samples per run, {seeds} paired "
            f"seeds, 300 held-out pictures; difference k1.5 - GRPO {100 * result['difference']:+.1f} +- "
            f"{100 * (result['difference_stderr'] or 0):.1f} points (paired).\n\n{text}\n"
        )
    write_json_line({"bench": "vision", **result, "rollouts": rollouts}, save=not cli.smoke)


if __name__ == "__main__":
    main()
