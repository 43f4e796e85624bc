"""Partial rollouts against full rollouts on a long-tailed task: trajectories per second, idle decode slots, accuracy.

    python -m bench.partial_rollouts            # ~80 minutes on a slow 2-core VM (9 runs, 2 at a time); resumes
    python -m bench.partial_rollouts --smoke    # seconds; what the test suite runs

Finished runs are kept in bench/results/partial_rollouts_runs.jsonl: an interrupted benchmark starts again where it
stopped (``--fresh-start`` runs everything again).

The long-tailed variant of the demo task: the warm-started model (k15_plugin/data/demo_checkpoint_longtail) puts
no "." filler before most answers but 40-56 before about one in seven, so most completions are 2-4 tokens and
a few about 50 (the filler is reward neutral). k1.5 mirror descent trains it for the same number of rollout batches
(so the same number of trained samples: 16 prompts x 8 per batch, 2 optimizer steps on each) in each arm, from the
same checkpoint and seeds:

* ``full``: TRL's own generation, up to 64 new tokens per trajectory in one call (transformers ``generate`` keeps
  every row of the call busy until the longest is done);
* ``partial``: ``rollout_segment_tokens=16``, continued over up to 4 rollout batches (loss on every token);
* ``fresh``: segments of 16 with ``rollout_prefill_batches=0``: each rollout batch generates round after round
  until its own groups have finished, so nothing is carried over (no stale tokens), but rows that finished early
  leave the later rounds;
* optional (``--arms``), ``partial`` with one option changed (:data:`VARIANTS`): ``latest``,
  ``rollout_loss_mask="latest"`` (loss on the tokens the current policy generated; it used to mean each trajectory's
  last segment), for the choice of the default mask; ``admission``, ``rollout_emit_order="admission"`` (batches in
  the prompts' arrival order instead of the oldest finished groups); ``cap2_regenerate``, ``cap2_drop``,
  ``cap2_mask``: a staleness cap of 2 optimizer steps (one rollout batch) with each ``rollout_stale_action``, for the
  choice of the defaults.

Runs go two at a time in their own processes (one core each), a seed's arms next to each other. Reported over the
steady state (the first 8 rollout batches, where the partial arm fills its buffer, are timed separately): trained
trajectories per second end to end and per second of generation alone, the share of decode slots that produced a kept
token (generated tokens / (rows x decode steps) per ``generate`` call), greedy held-out accuracy at the end, the
length distribution of trained trajectories, and staleness. Last line: {"bench": "partial_rollouts",
"throughput_ratio", "generation_throughput_ratio", "accuracy_delta", "seeds", ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from bench.common import RESULTS, build_trainer, machine, run_jobs, write_json_line

# The measured setting, and the smoke test's (a few seconds: 2 prompts x 8 samples, 16 tokens in segments of 8).
FULL = {"max_tokens": 64, "segment": 16, "rows": 128}
SMOKE = {"max_tokens": 16, "segment": 8, "rows": 16}
# Optional arms: partial rollouts with one option changed.
VARIANTS = {
    "latest": {"rollout_loss_mask": "latest"},
    "admission": {"rollout_emit_order": "admission"},
    "cap2_regenerate": {"rollout_max_staleness": 2, "rollout_stale_action": "regenerate"},
    "cap2_drop": {"rollout_max_staleness": 2, "rollout_stale_action": "drop"},
    "cap2_mask": {"rollout_max_staleness": 2, "rollout_stale_action": "mask"},
}
ARMS = ("full", "partial", "fresh", *VARIANTS)
PASSES = 2  # optimizer steps per rollout batch (num_iterations, the k1.5 trainer's default)


def warmup_batches(setting: dict) -> int:
    """Rollout batches excluded from the steady-state figures: the partial arm's buffer fills during them."""
    return 2 * setting["max_tokens"] // setting["segment"]


def arm_options(arm: str, setting: dict) -> dict:
    if arm == "full":
        return {}
    options = {"rollout_segment_tokens": setting["segment"]}
    if arm == "fresh":  # nothing in flight between rollout batches: no stale tokens
        options["rollout_prefill_batches"] = 0
    return {**options, **VARIANTS.get(arm, {})}


LONG = 40  # tokens: a trajectory at least this long counts as long
# Repeat detection's false positives on this model's normal outputs (a run of 40-56 "." filler is legitimate here):
# the default rule, and a stricter one with a 32-token span, applied post hoc to every trained trajectory.
REPEAT_RULES = {
    "default (16-1024 x4, span 64)": {},
    "span 32, periods 1-8": {"min_period": 1, "max_period": 8, "min_span": 32},
}


def one_run(arm: str, seed: int, steps: int, setting: dict) -> dict:
    from transformers import TrainerCallback

    from k15_plugin.core import RepeatRule
    from k15_plugin.data.arithmetic import (
        DEMO_LONGTAIL_CHECKPOINT_DIR,
        ArithmeticReward,
        evaluate_greedy,
        load_demo_checkpoint,
        make_datasets,
    )

    torch.set_num_threads(1)
    rules = {name: RepeatRule(**kwargs) for name, kwargs in REPEAT_RULES.items()}
    max_tokens, rows, warmup = setting["max_tokens"], setting["rows"], warmup_batches(setting)
    model, tokenizer = load_demo_checkpoint(DEMO_LONGTAIL_CHECKPOINT_DIR)
    train, heldout = make_datasets(seed=seed)
    heldout = heldout.select(range(setting.get("heldout", len(heldout))))
    before = evaluate_greedy(model, tokenizer, heldout, max_new_tokens=max_tokens, allow_filler=True)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % PASSES == 0:  # the end of a rollout batch
                self.ends.append(time.perf_counter())

    clock, calls, lengths, trained = StepClock(), [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(
            "kimi_md",
            model,
            tokenizer,
            train,
            [ArithmeticReward(tokenizer, allow_filler=True)],
            tmp,
            callbacks=[clock],
            seed=seed,
            max_steps=steps * PASSES,
            num_iterations=PASSES,
            logging_steps=1,
            max_completion_length=max_tokens,
            per_device_train_batch_size=rows,
            **arm_options(arm, setting),
        )
        single_turn = trainer._generate_single_turn

        def timed(prompt_ids, *args, **kwargs):  # every generate call of either arm, with its decode slots
            t0 = time.perf_counter()
            ids, logprobs = single_turn(prompt_ids, *args, **kwargs)
            steps_run = max((len(x) for x in ids), default=0)
            calls.append(
                (trainer.state.global_step, time.perf_counter() - t0, sum(map(len, ids)), len(ids) * steps_run)
            )
            return ids, logprobs

        trainer._generate_single_turn = timed
        calculate = trainer._calculate_rewards

        def recording(inputs, prompts, completions, completion_ids_list):
            lengths.extend(len(x) for x in completion_ids_list)
            trained.extend(list(x) for x in completion_ids_list)
            return calculate(inputs, prompts, completions, completion_ids_list)

        trainer._calculate_rewards = recording
        start = time.perf_counter()
        trainer.train()
    after = evaluate_greedy(trainer.model, tokenizer, heldout, max_new_tokens=max_tokens, allow_filler=True)
    ends = [start, *clock.ends]
    steady = ends[warmup:]
    steady_calls = [c for c in calls if c[0] >= warmup * PASSES]  # c[0]: the optimizer step generation ran at
    logs = [h for h in trainer.state.log_history if "k15/partial/oldest_token_age" in h and h["step"] > warmup * PASSES]
    return {
        "arm": arm,
        "seed": seed,
        "steps": steps,
        "seconds_total": ends[-1] - start,
        "seconds_warmup": ends[warmup] - start,
        "trajectories_per_second": rows * (len(steady) - 1) / (steady[-1] - steady[0]),
        "generation_trajectories_per_second": rows * (len(steady) - 1) / sum(c[1] for c in steady_calls),
        "generation_share": sum(c[1] for c in steady_calls) / (steady[-1] - steady[0]),
        "slot_utilization": sum(c[2] for c in steady_calls) / max(1, sum(c[3] for c in steady_calls)),
        "generate_calls_per_batch": len(steady_calls) / (len(steady) - 1),
        "long_share": sum(n >= LONG for n in lengths) / len(lengths),
        "mean_trajectory_tokens": statistics.mean(lengths),
        "oldest_token_age": max((h["k15/partial/oldest_token_age"] for h in logs), default=0.0),
        "stale_token_share": statistics.mean(h["k15/partial/stale_token_share"] for h in logs) if logs else 0.0,
        "repeat_flagged": {name: _flagged(trained, rule) / len(trained) for name, rule in rules.items()},
        "before": before,
        "after": after,
    }


def _flagged(sequences: list[list[int]], rule) -> int:
    """How many of ``sequences`` contain a repeat under ``rule`` (the streaming detector over all rows at once)."""
    from k15_plugin.core import RepeatDetector

    width = max(map(len, sequences))
    pad = iter(range(-2, -2 - len(sequences) * width, -1))  # distinct negatives: never equal to a token or each other
    rows = torch.tensor([ids + [next(pad) for _ in range(width - len(ids))] for ids in sequences])
    return int((RepeatDetector(len(sequences), rule).scan(rows) >= 0).sum())


def _mean(runs, arm, key, sub=None):
    values = [r[key][sub] if sub else r[key] for r in runs if r["arm"] == arm]
    return statistics.mean(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=20, help=f"rollout batches per run ({PASSES} optimizer steps each)"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", default="full,partial,fresh", help="comma-separated, from " + ",".join(ARMS))
    parser.add_argument("--fresh-start", action="store_true", help="run every job again (ignore finished runs)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, each in its own process (0: here)")
    parser.add_argument("--smoke", action="store_true", help="1 seed, a few steps, nothing saved")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.one:
        print(json.dumps(one_run(*json.loads(cli.one))))
        return
    torch.set_num_threads(1)
    arms = cli.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or "full" not in arms or "partial" not in arms:
        parser.error(f"--arms: full and partial are needed, and only {', '.join(ARMS)} exist (got {cli.arms})")
    setting = FULL
    if cli.smoke:
        setting = {**SMOKE, "heldout": 50}
        cli.seeds, cli.steps, cli.workers, arms = 1, warmup_batches(SMOKE) + 2, 0, ["full", "partial", "fresh"]
    if cli.steps < warmup_batches(setting) + 2:
        parser.error(f"--steps: at least {warmup_batches(setting) + 2} (the warm-up is {warmup_batches(setting)})")

    jobs = [(arm, seed, cli.steps, setting) for seed in range(cli.seeds) for arm in arms]  # a seed's arms side by side
    cache = None if cli.smoke else RESULTS / "partial_rollouts_runs.jsonl"
    if cache is not None and cli.fresh_start:
        cache.unlink(missing_ok=True)
    runs = run_jobs("bench.partial_rollouts", one_run, jobs, cli.workers, cache)

    lines = [
        "| arm | trajectories/s end to end | trajectories/s of generation | decode slots used | generation share "
        "of a step | held-out accuracy | long trajectories | oldest token age | stale tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        accs = [r["after"]["accuracy"] for r in runs if r["arm"] == arm]
        lines.append(
            f"| {arm} | {_mean(runs, arm, 'trajectories_per_second'):.1f} | "
            f"{_mean(runs, arm, 'generation_trajectories_per_second'):.1f} | "
            f"{_mean(runs, arm, 'slot_utilization'):.2f} | "
            f"{_mean(runs, arm, 'generation_share'):.2f} | {statistics.mean(accs):.3f} "
            f"({', '.join(f'{a:.3f}' for a in accs)}) | {_mean(runs, arm, 'long_share'):.3f} | "
            f"{_mean(runs, arm, 'oldest_token_age'):.1f} | {_mean(runs, arm, 'stale_token_share'):.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    start_acc = statistics.mean(r["before"]["accuracy"] for r in runs)

    def ratio(key: str, arm: str = "partial") -> float:
        return round(_mean(runs, arm, key) / _mean(runs, "full", key), 3)

    def paired_deltas(arm: str) -> list[float]:  # arm - full, seed by seed
        acc = {(r["arm"], r["seed"]): r["after"]["accuracy"] for r in runs}
        return [round(acc[arm, seed] - acc["full", seed], 4) for seed in range(cli.seeds)]

    accuracy = {arm: _mean(runs, arm, "after", "accuracy") for arm in arms}
    result = {
        "bench": "partial_rollouts",
        "throughput_ratio": ratio("trajectories_per_second"),
        "generation_throughput_ratio": ratio("generation_trajectories_per_second"),
        "accuracy_delta": round(accuracy["partial"] - accuracy["full"], 4),
        "accuracy_delta_per_seed": paired_deltas("partial"),
        "slot_utilization": {arm: round(_mean(runs, arm, "slot_utilization"), 3) for arm in arms},
        "accuracy": {arm: round(value, 4) for arm, value in accuracy.items()},
        "accuracy_before": round(start_acc, 4),
        "repeat_false_positive_rate": {
            name: round(statistics.mean(r["repeat_flagged"][name] for r in runs), 4) for name in REPEAT_RULES
        },
        "warmup_seconds": {arm: round(_mean(runs, arm, "seconds_warmup"), 1) for arm in arms},
        "steps": cli.steps,
        "segment_tokens": setting["segment"],
        "max_completion_length": setting["max_tokens"],
        "rows_per_batch": setting["rows"],
        "seeds": cli.seeds,
    }
    for arm in arms:  # fresh (segments without carry-over) and the variants, each against full
        if arm in ("full", "partial", "latest"):
            continue
        result[arm] = {
            "throughput_ratio": ratio("trajectories_per_second", arm),
            "generation_throughput_ratio": ratio("generation_trajectories_per_second", arm),
            "accuracy_delta": round(accuracy[arm] - accuracy["full"], 4),
            "accuracy_delta_per_seed": paired_deltas(arm),
        }
    if "latest" in arms:
        result["latest_minus_all_accuracy"] = round(accuracy["latest"] - accuracy["partial"], 4)
    if not cli.smoke:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "partial_rollouts.md").write_text(
            f"# partial_rollouts ({time.strftime('%Y-%m-%d')}, {machine()})\n\n{cli.steps} rollout batches of "
            f"{setting['rows'] // 8} prompts x 8, max {setting['max_tokens']} tokens, segments of "
            f"{setting['segment']}, {cli.seeds} seeds; steady state after {warmup_batches(setting)} batches; "
            f"held-out accuracy greedy on {setting.get('heldout', 500)} prompts (start "
            f"{start_acc:.3f}).\n\n{table}\n"
        )
    write_json_line(result, save=not cli.smoke)


if __name__ == "__main__":
    main()
