"""Partial rollouts against full rollouts: throughput end to end and of generation, padding, staleness, accuracy.

    python -m bench.partial_rollouts                          # long-tailed demo: 6 arms x 6 seeds, one run at a
                                                              # time (~35 min on an idle 2-core machine, estimated)
    python -m bench.partial_rollouts --quick                  # 4 arms x 2 seeds, fewer rollout batches (~6 min)
    python -m bench.partial_rollouts --task demo_chain        # chained addition: 6 arms x 6 seeds (73 min measured)
    python -m bench.partial_rollouts --task demo_chain --quick                      # ~15 min
    python -m bench.partial_rollouts --arms full,partial,token_mask,sequence_mask   # any arms of ARMS (full needed)
    python -m bench.partial_rollouts --smoke [--task demo_chain]                    # seconds; what the suite runs

**Tasks.** ``longtail`` (the default): the long-tailed variant of the demo task; the warm-started model
(k15_plugin/data/demo_checkpoint_longtail) puts no "." filler before most answers but 40-56 before about one in seven,
so most completions are 2-4 tokens and a few about 50 (the filler is reward neutral); at most 64 new tokens, segments
of 16, greedy held-out accuracy on 500 prompts. ``demo_chain`` (``data=demo_chain``, the shipped tiny_demo_chain):
``a1+...+ak=`` with k in 2..8, worked answers of 4 to 115 tokens (long for hard chains); at most
``k15_plugin.data.chain.max_new_tokens()`` = 115 new tokens, segments of 23 (5 rounds), greedy held-out accuracy on
700 chains (100 per k), scored as bench.ablations scores them (``chain_evaluate``).

**Arms** (:data:`ARMS`; k1.5 mirror descent, the same number of rollout batches of 16 prompts x 8 samples, 2
optimizer steps on each, from the same checkpoint and seeds):

* ``full``: TRL's own generation, every trajectory to the end in one call (transformers ``generate`` keeps every row
  of the call busy until the longest is done);
* ``partial``: ``rollout_segment_tokens`` per round, unfinished trajectories carried over to the next rollout batches,
  as the paper describes it (:data:`PAPER`: no off-policy correction, no staleness cap, the oldest finished groups
  first, every token trained);
* ``shipped``: ``rollout=partial`` with the defaults it ships with (``conf/rollout/partial.yaml``; the headline of
  the last line); not run when another arm of the run has the same options (that arm is the headline then);
* ``token_is``, ``token_mask``, ``sequence_mask``: ``partial`` with that ``rollout_correction`` at the default
  ``rollout_is_cap``;
* ``admission`` (``rollout_emit_order="admission"``: batches in the prompts' arrival order, not the oldest finished
  groups first, which sorts batches by length); ``cap2_regenerate``, ``cap2_drop``, ``cap2_mask`` (a staleness cap of
  2 optimizer steps, one rollout batch, with each ``rollout_stale_action``); ``latest`` (``rollout_loss_mask="latest"``:
  the loss on the current policy's tokens only): ``partial`` with that one option changed;
* ``fresh``: segments with ``rollout_prefill_batches=0``: each rollout batch generates round after round until its
  own groups have finished, nothing carried over (no stale tokens), finished rows leave the later rounds.

By default :data:`DEFAULT_ARMS` (full, partial, shipped, token_is, admission, cap2_regenerate, fresh) over 6
seeds; ``--quick`` :data:`QUICK_ARMS` over 2 seeds with fewer rollout batches (and 140 held-out chains on
demo_chain); ``--arms`` picks any. Seed s runs every arm with the same data order and initial checkpoint (paired);
a seed's arms run back to back, their order rotated by one from seed to seed, so a slow drift of the machine does not
favour an arm.

**One run at a time** (``--workers`` 1, the default). Every run is timed, and two runs sharing a 2-core machine slow
each other by amounts that depend on what runs beside them: an earlier version of this benchmark ran two at a time on
a loaded machine and measured a run at 27x its time on a quieter one, with identical trajectories. Each run still
gets a fresh process (one torch thread). ``--workers 0`` runs in this process (the smoke test); more than 1 only for
accuracy, never for the timings.

**Reported per arm**, over the steady state (after the first ``2 x max tokens / segment`` rollout batches, where the
partial arms fill their buffer), means over seeds:

* trained trajectories per second end to end and per second of generation alone (seconds inside TRL's
  ``_generate_single_turn``), and the generation share of a step (generation seconds / step seconds);
* decode padding: the share of decode slots that produced no kept token (1 - generated tokens / (rows x decode steps)
  per ``generate`` call); training padding: the share of padded completion positions in the trained batches (TRL
  pads each batch to its longest completion, so batches sorted by length train narrow and cheap), and their width;
* stale-token share and oldest token age (``k15/partial/*``, over the tokens the loss trains); the normalised
  effective sample size of the importance ratios pi_i / mu of the trained tokens (``k15/off_policy/ess``), of the
  sequences' products (``sequence_ess``) and of the weights the correction applies (``weight_ess``), the share of
  ratios outside [1/cap, cap] and of zero weights: logged for every partial arm, ``correction=none`` included (TRL
  recomputes pi_i for the second optimizer step anyway); 1 by definition for ``full``;
* greedy held-out accuracy at the end, the length distribution of trained trajectories, the repeat rules' false
  positives on them;
* against ``full``, seed by seed: the accuracy difference and the ratios of trajectories per second (end to end and of
  generation), each as mean and standard error over seeds;
* a cost model: with generation a share g of a ``full`` step and s times faster, a step costs (1 - g) + g / s of
  ``full``'s when training costs the same per trajectory, so the end-to-end gain is 1 / ((1 - g) + g / s): computed
  from the measured s at the measured g and at g = 0.7, 0.8, 0.9 (a GPU run of long chain-of-thought), to set
  beside the measured end-to-end ratio (which also holds the training-padding effect).

Files (``<prefix>`` = partial_rollouts for longtail, partial_rollouts_demo_chain for demo_chain): results/<prefix>.md
(tables), results/<prefix>.json (the last line), results/<prefix>_runs.jsonl (finished runs: an interrupted benchmark
resumes where it stopped; a job is keyed by task, arm, the arm's trainer options, seed, rollout batches and setting,
so a changed arm runs again; ``--fresh-start`` runs everything again). Last line: {"bench": "partial_rollouts",
"task", "throughput_ratio", "generation_throughput_ratio", "accuracy_delta", "accuracy_delta_stderr", "correction",
"max_staleness", "padding_share", "ess" (the ``partial`` arm against ``full``), "seeds", "arms": {arm: {...}},
"cost_model", ...}; ``throughput_ratio`` and ``generation_throughput_ratio`` are means over seeds of each seed's
``partial`` / ``full`` ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time

import torch

from bench.common import RESULTS, build_trainer, machine, run_jobs, write_json_line
from k15_plugin.data.chain import max_new_tokens

# Per task: the file prefix, and the measured, --quick and --smoke settings: max_tokens (the length cap), segment
# (partial rollouts' tokens per round), rows (trajectories per rollout batch), heldout (prompts scored at the end),
# train (the chain task's training chains).
TASKS = {
    "longtail": {
        "prefix": "partial_rollouts",
        "full": {"max_tokens": 64, "segment": 16, "rows": 128, "heldout": 500},
        "quick": {"max_tokens": 64, "segment": 16, "rows": 128, "heldout": 500},
        "smoke": {"max_tokens": 16, "segment": 8, "rows": 16, "heldout": 50},
    },
    "demo_chain": {
        "prefix": "partial_rollouts_demo_chain",
        "full": {"max_tokens": max_new_tokens(), "segment": 23, "rows": 128, "heldout": 700, "train": 10_000},
        "quick": {"max_tokens": max_new_tokens(), "segment": 23, "rows": 128, "heldout": 140, "train": 10_000},
        "smoke": {"max_tokens": 24, "segment": 12, "rows": 16, "heldout": 14, "train": 200},
    },
}
# Arms beside full: partial rollouts (segments of the setting's size) as the paper describes them (PAPER: no
# correction, no staleness cap, the oldest finished groups first, every token trained) with at most one option changed
# (arm_options), written out in full so that a later change of the shipped defaults cannot reuse a cached run; and
# "shipped", whatever `rollout=partial` resolves to today (the headline; skipped while it equals "partial").
PAPER = {
    "rollout_correction": "none",
    "rollout_emit_order": "ready",
    "rollout_max_staleness": 0,
    "rollout_loss_mask": "all",
    "rollout_prefill_batches": -1,
}
VARIANTS = {
    "partial": {},
    "shipped": None,  # the config's defaults (shipped_options)
    "token_is": {"rollout_correction": "token_is"},
    "token_mask": {"rollout_correction": "token_mask"},
    "sequence_mask": {"rollout_correction": "sequence_mask"},
    "admission": {"rollout_emit_order": "admission"},
    "cap2_regenerate": {"rollout_max_staleness": 2, "rollout_stale_action": "regenerate"},
    "cap2_drop": {"rollout_max_staleness": 2, "rollout_stale_action": "drop"},
    "cap2_mask": {"rollout_max_staleness": 2, "rollout_stale_action": "mask"},
    "latest": {"rollout_loss_mask": "latest"},
    "fresh": {"rollout_prefill_batches": 0},  # nothing in flight between rollout batches: no stale tokens
}
ARMS = ("full", *VARIANTS)
DEFAULT_ARMS = ("full", "partial", "shipped", "token_is", "admission", "cap2_regenerate", "fresh")
QUICK_ARMS = ("full", "partial", "token_is", "admission")
SMOKE_ARMS = ("full", "partial", "token_is", "fresh")
SEEDS, QUICK_SEEDS = 6, 2
STEPS = 20  # rollout batches per run; --quick: the warm-up + QUICK_STEADY
QUICK_STEADY = 6
PASSES = 2  # optimizer steps per rollout batch (num_iterations, the k1.5 trainer's default)
GENERATION_SHARES = (0.7, 0.8, 0.9)  # the cost model's generation shares of a step (a GPU run of long CoT)
# The rollout options each run records as its trainer resolved them.
ROLLOUT_FIELDS = (
    "rollout_segment_tokens",
    "rollout_prefill_batches",
    "rollout_correction",
    "rollout_is_cap",
    "rollout_emit_order",
    "rollout_max_staleness",
    "rollout_stale_action",
    "rollout_loss_mask",
)


def warmup_batches(setting: dict) -> int:
    """Rollout batches excluded from the steady-state figures: the partial arms fill their buffer during them."""
    return 2 * setting["max_tokens"] // setting["segment"]


def shipped_options() -> dict:
    """The options of :data:`PAPER` (and the cap's action and ratio cap) as ``rollout=partial`` ships them
    (``conf/rollout/partial.yaml``)."""
    from omegaconf import OmegaConf

    from k15_plugin.cli.train import config_dir

    shipped = OmegaConf.load(config_dir() / "rollout" / "partial.yaml")
    names = {*PAPER, "rollout_stale_action", "rollout_is_cap"}
    return {name: shipped[name.removeprefix("rollout_")] for name in sorted(names)}


def arm_options(arm: str, setting: dict) -> dict:
    """The trainer options of ``arm`` (beyond what every arm shares): none for ``full``, else segments plus
    :data:`PAPER` and the arm's :data:`VARIANTS` entry (``shipped``: :func:`shipped_options`)."""
    if arm == "full":
        return {}
    variant = shipped_options() if VARIANTS[arm] is None else {**PAPER, **VARIANTS[arm]}
    return {"rollout_segment_tokens": setting["segment"], **variant}


def effective(options: dict) -> dict:
    """``options`` without what plays no part in them: the cap's action without a cap, the ratio cap without a
    correction."""
    out = dict(options)
    if out.get("rollout_max_staleness", 0) == 0:
        out.pop("rollout_stale_action", None)
    if out.get("rollout_correction", "none") == "none":
        out.pop("rollout_is_cap", None)
    return out


def shipped_as(setting: dict, arms: list[str]) -> str | None:
    """The arm of ``arms`` (``full`` and ``shipped`` aside) that trains exactly as ``rollout=partial``'s shipped
    defaults, if any (then ``shipped`` is not run again: its runs would repeat that arm's)."""
    shipped = effective(arm_options("shipped", setting))
    return next(
        (a for a in arms if a not in ("full", "shipped") and effective(arm_options(a, setting)) == shipped), None
    )


LONG_SHARE = 0.5  # a trajectory at least this share of the length cap counts as long
# Repeat detection's false positives on this model's normal outputs (a run of 40-56 "." filler is legitimate on the
# long-tailed task): the default rule, and a stricter one with a 32-token span, applied post hoc to every trained
# trajectory.
REPEAT_RULES = {
    "default (16-1024 x4, span 64)": {},
    "span 32, periods 1-8": {"min_period": 1, "max_period": 8, "min_span": 32},
}


def load_task(task: str, seed: int, setting: dict):
    """model, tokenizer, training set, reward functions and the held-out evaluation (model -> dict with
    ``accuracy``) of ``task`` for ``seed``."""
    if task == "demo_chain":
        from bench.ablations import chain_evaluate
        from bench.common import chain_task

        model, tokenizer, train, heldout, rewards = chain_task(seed, setting["heldout"], num_train=setting["train"])
        return model, tokenizer, train, rewards, lambda m: chain_evaluate(m, tokenizer, heldout)
    from k15_plugin.data.arithmetic import (
        DEMO_LONGTAIL_CHECKPOINT_DIR,
        ArithmeticReward,
        evaluate_greedy,
        load_demo_checkpoint,
        make_datasets,
    )

    model, tokenizer = load_demo_checkpoint(DEMO_LONGTAIL_CHECKPOINT_DIR)
    train, heldout = make_datasets(seed=seed)
    heldout = heldout.select(range(min(setting["heldout"], len(heldout))))
    rewards = [ArithmeticReward(tokenizer, allow_filler=True)]
    return (
        model,
        tokenizer,
        train,
        rewards,
        lambda m: evaluate_greedy(m, tokenizer, heldout, max_new_tokens=setting["max_tokens"], allow_filler=True),
    )


def one_run(task: str, arm: str, options: dict, seed: int, steps: int, setting: dict) -> dict:
    """One arm, one seed: train ``steps`` rollout batches with ``options``, timing every generate call and recording
    every trained batch; the held-out evaluation at the end (and before training, in the ``full`` arm only: it is
    the same for every arm of a seed)."""
    from transformers import TrainerCallback

    from k15_plugin.core import RepeatRule

    torch.set_num_threads(1)
    rules = {name: RepeatRule(**kwargs) for name, kwargs in REPEAT_RULES.items()}
    max_tokens, rows, warmup = setting["max_tokens"], setting["rows"], warmup_batches(setting)
    model, tokenizer, train, rewards, evaluate = load_task(task, seed, setting)
    before = evaluate(model) if arm == "full" else None

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % PASSES == 0:  # the end of a rollout batch
                self.ends.append(time.perf_counter())

    clock, calls, batches, trained = StepClock(), [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(
            "kimi_md",
            model,
            tokenizer,
            train,
            rewards,
            tmp,
            callbacks=[clock],
            seed=seed,
            max_steps=steps * PASSES,
            num_iterations=PASSES,
            logging_steps=1,
            max_completion_length=max_tokens,
            per_device_train_batch_size=rows,
            **options,
        )
        single_turn = trainer._generate_single_turn

        def timed(prompt_ids, *args, **kwargs):  # every generate call of any arm, with its decode slots
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
            trained.extend(list(x) for x in completion_ids_list)
            return calculate(inputs, prompts, completions, completion_ids_list)

        trainer._calculate_rewards = recording
        generate_and_score = trainer._generate_and_score_completions

        def batch_padding(inputs):  # the batch TRL trains (one micro-batch per optimizer step here): its padding
            output = generate_and_score(inputs)
            mask = output["completion_mask"]  # (B, C) 1 on completion tokens, 0 on padding
            batches.append((trainer.state.global_step, int(mask.sum()), mask.numel(), mask.shape[1]))
            return output

        trainer._generate_and_score_completions = batch_padding
        start = time.perf_counter()
        trainer.train()
        resolved = {name: getattr(trainer.args, name) for name in ROLLOUT_FIELDS}
    after = evaluate(trainer.model)
    ends = [start, *clock.ends]
    steady = ends[warmup:]
    seconds = steady[-1] - steady[0]
    first = warmup * PASSES  # the optimizer step at which the first steady rollout batch is generated
    steady_calls = [c for c in calls if c[0] >= first]  # c[0]: the optimizer step generation ran at
    steady_batches = [b for b in batches if b[0] >= first]
    generation_seconds = sum(c[1] for c in steady_calls)
    logs = [h for h in trainer.state.log_history if h.get("step", 0) > first]

    def logged(key: str, on_policy: float) -> float | None:  # the steady-state mean of a per-rollout-batch metric
        values = [h[key] for h in logs if key in h]
        if values:
            return statistics.mean(values)
        return on_policy if arm == "full" else None  # full: on-policy by construction; else not logged

    lengths = [len(x) for x in trained]
    return {
        "task": task,
        "arm": arm,
        "seed": seed,
        "steps": steps,
        "options": options,
        "settings": resolved,
        "seconds_total": ends[-1] - start,
        "seconds_warmup": ends[warmup] - start,
        "trajectories_per_second": rows * (len(steady) - 1) / seconds,
        "generation_trajectories_per_second": rows * (len(steady) - 1) / generation_seconds,
        "generation_share": generation_seconds / seconds,
        "train_seconds_per_batch": (seconds - generation_seconds) / (len(steady) - 1),
        "slot_utilization": sum(c[2] for c in steady_calls) / max(1, sum(c[3] for c in steady_calls)),
        "decode_padding_share": 1 - sum(c[2] for c in steady_calls) / max(1, sum(c[3] for c in steady_calls)),
        "train_padding_share": 1 - sum(b[1] for b in steady_batches) / max(1, sum(b[2] for b in steady_batches)),
        "train_width": statistics.mean(b[3] for b in steady_batches),
        "train_widths": [b[3] for b in steady_batches],
        "generate_calls_per_batch": len(steady_calls) / (len(steady) - 1),
        "long_share": sum(n >= LONG_SHARE * max_tokens for n in lengths) / len(lengths),
        "mean_trajectory_tokens": statistics.mean(lengths),
        "oldest_token_age": max(
            (h["k15/partial/oldest_token_age"] for h in logs if "k15/partial/oldest_token_age" in h), default=0.0
        ),
        "stale_token_share": logged("k15/partial/stale_token_share", 0.0),
        # the importance ratios pi_i / mu: all 1 in full (ESS 1, nothing outside the cap)
        "ess": logged("k15/off_policy/ess", 1.0),
        "sequence_ess": logged("k15/off_policy/sequence_ess", 1.0),
        "weight_ess": logged("k15/off_policy/weight_ess", 1.0),
        "outside_share": logged("k15/off_policy/outside_share", 0.0),
        "zero_weight_share": logged("k15/off_policy/zero_weight_share", 0.0),
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


# ----------------------------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------------------------


def end_to_end_gain(g: float, s: float) -> float:
    """The end-to-end speed-up when generation, a share ``g`` of a step, runs ``s`` times faster and the rest of the
    step costs the same: 1 / ((1 - g) + g / s) (Amdahl's law)."""
    return 1.0 / ((1.0 - g) + g / s)


def _mean(xs):
    """The mean of the values that are not None; None if there are none."""
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def _stderr(xs):
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None


def _round(x, digits: int = 4):
    return None if x is None else round(x, digits)


def _accuracy(run: dict) -> float:
    return run["after"]["accuracy"]


def _tps(run: dict) -> float:
    return run["trajectories_per_second"]


def _gen_tps(run: dict) -> float:
    return run["generation_trajectories_per_second"]


def summarize(runs: list[dict], arms: list[str]) -> dict:
    """Per arm: the means over seeds, and against ``full`` the paired (same-seed) accuracy differences and throughput
    ratios with their standard errors and the cost model."""
    by = {(r["arm"], r["seed"]): r for r in runs}
    full_share = _mean([r["generation_share"] for r in runs if r["arm"] == "full"])
    out = {}
    for arm in arms:
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        block = {
            "options": mine[0]["options"],
            "correction": mine[0]["settings"]["rollout_correction"] if arm != "full" else "none",
            "is_cap": mine[0]["settings"]["rollout_is_cap"],
            "max_staleness": mine[0]["settings"]["rollout_max_staleness"],
            "seeds": len(mine),
            "accuracy": _round(_mean([_accuracy(r) for r in mine])),
            "accuracy_per_seed": [_round(_accuracy(r)) for r in mine],
            **{
                key: _round(_mean([r[key] for r in mine]))
                for key in (
                    "trajectories_per_second",
                    "generation_trajectories_per_second",
                    "generation_share",
                    "train_seconds_per_batch",
                    "decode_padding_share",
                    "train_padding_share",
                    "train_width",
                    "stale_token_share",
                    "oldest_token_age",
                    "ess",
                    "sequence_ess",
                    "weight_ess",
                    "outside_share",
                    "zero_weight_share",
                    "long_share",
                    "mean_trajectory_tokens",
                    "generate_calls_per_batch",
                    "seconds_total",
                    "seconds_warmup",
                )
            },
        }
        if arm != "full":
            seeds = [r["seed"] for r in mine if ("full", r["seed"]) in by]
            acc = [_accuracy(by[arm, s]) - _accuracy(by["full", s]) for s in seeds]
            tps = [_tps(by[arm, s]) / _tps(by["full", s]) for s in seeds]
            gen = [_gen_tps(by[arm, s]) / _gen_tps(by["full", s]) for s in seeds]
            s = _mean(gen)
            block.update(
                {
                    "paired_seeds": len(seeds),
                    "accuracy_delta": _round(_mean(acc)),
                    "accuracy_delta_stderr": _round(_stderr(acc)),
                    "accuracy_delta_per_seed": [_round(x) for x in acc],
                    "throughput_ratio": _round(_mean(tps), 3),
                    "throughput_ratio_stderr": _round(_stderr(tps), 3),
                    "throughput_ratio_per_seed": [_round(x, 3) for x in tps],
                    "generation_throughput_ratio": _round(s, 3),
                    "generation_throughput_ratio_stderr": _round(_stderr(gen), 3),
                    "cost_model": None
                    if s is None or full_share is None
                    else {
                        "generation_speedup": _round(s, 3),
                        "measured_generation_share": _round(full_share, 3),
                        "gain_at_measured_share": _round(end_to_end_gain(full_share, s), 3),
                        **{f"gain_at_{g}": _round(end_to_end_gain(g, s), 3) for g in GENERATION_SHARES},
                    },
                }
            )
        out[arm] = block
    return out


def _pm(mean, stderr, digits: int) -> str:
    if mean is None:
        return ""
    return f"{mean:+.{digits}f}" + ("" if stderr is None else f" ± {stderr:.{digits}f}")


def _f(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ratio(mean, stderr) -> str:
    if mean is None:
        return ""
    return f"{mean:.2f}" + ("" if stderr is None else f" ± {stderr:.2f}")


def tables(summary: dict) -> str:
    """The markdown tables: per arm, against full, and the cost model."""
    lines = [
        "| arm | trajectories/s end to end | trajectories/s of generation | generation share of a step | "
        "decode padding | training padding (batch width) | stale tokens (oldest, steps) | ESS token / sequence / "
        "weights | held-out accuracy (per seed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, b in summary.items():
        lines.append(
            f"| {arm} | {b['trajectories_per_second']:.1f} | {b['generation_trajectories_per_second']:.1f} | "
            f"{b['generation_share']:.2f} | {b['decode_padding_share']:.2f} | {b['train_padding_share']:.2f} "
            f"({b['train_width']:.0f}) | {_f(b['stale_token_share'])} ({b['oldest_token_age']:.0f}) | "
            f"{_f(b['ess'])} / {_f(b['sequence_ess'])} / {_f(b['weight_ess'])} | {b['accuracy']:.3f} "
            f"({', '.join(f'{a:.3f}' for a in b['accuracy_per_seed'])}) |"
        )
    lines += [
        "",
        "Against `full`, seed by seed (mean ± standard error over the paired seeds):",
        "",
        "| arm | seeds | accuracy difference (points) | trajectories/s ratio end to end | of generation |",
        "|---|---|---|---|---|",
    ]
    for arm, b in summary.items():
        if arm == "full":
            continue
        delta = None if b["accuracy_delta"] is None else 100 * b["accuracy_delta"]
        delta_se = None if b["accuracy_delta_stderr"] is None else 100 * b["accuracy_delta_stderr"]
        lines.append(
            f"| {arm} | {b['paired_seeds']} | {_pm(delta, delta_se, 1)} | "
            f"{_ratio(b['throughput_ratio'], b['throughput_ratio_stderr'])} | "
            f"{_ratio(b['generation_throughput_ratio'], b['generation_throughput_ratio_stderr'])} |"
        )
    shares = " | ".join(f"g = {g}" for g in GENERATION_SHARES)
    lines += [
        "",
        "Cost model: generation a share g of a `full` step, s times faster in the arm, the rest of the step unchanged: "
        "end-to-end gain 1 / ((1 - g) + g / s). s is the measured generation ratio; the measured g is `full`'s "
        "generation share here; g = 0.7-0.9 is a GPU run of long chain-of-thought. The measured end-to-end ratio "
        "also holds what the model leaves out (training padding, skipped rounds, the correction's cost).",
        "",
        f"| arm | s | measured g | gain at measured g | {shares} | measured end to end |",
        f"|---|---|---|---|{'---|' * len(GENERATION_SHARES)}---|",
    ]
    for arm, b in summary.items():
        cost = b.get("cost_model")
        if not cost:
            continue
        gains = " | ".join(f"{cost[f'gain_at_{g}']:.2f}" for g in GENERATION_SHARES)
        lines.append(
            f"| {arm} | {cost['generation_speedup']:.2f} | {cost['measured_generation_share']:.2f} | "
            f"{cost['gain_at_measured_share']:.2f} | {gains} | {b['throughput_ratio']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run (or resume) the arms of ``--task``, write the tables and the JSON, print the JSON line last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--task", choices=list(TASKS), default="longtail", help="longtail (a+b=, long-tailed) or demo_chain"
    )
    parser.add_argument("--steps", type=int, help=f"rollout batches per run ({PASSES} optimizer steps each); {STEPS}")
    parser.add_argument("--seeds", type=int, help=f"paired seeds; {SEEDS} ({QUICK_SEEDS} with --quick)")
    parser.add_argument("--arms", help=f"comma-separated, from {','.join(ARMS)}; default {','.join(DEFAULT_ARMS)}")
    parser.add_argument("--fresh-start", action="store_true", help="run every job again (ignore finished runs)")
    parser.add_argument(
        "--workers", type=int, default=1, help="runs at a time, each in its own process (0: here); 1: timings"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_SEEDS} seeds, the warm-up + {QUICK_STEADY} rollout batches, arms {','.join(QUICK_ARMS)}",
    )
    parser.add_argument("--smoke", action="store_true", help="1 seed, tiny settings, a few arms, nothing saved")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run (a job as JSON) in this process
    cli = parser.parse_args()
    if cli.one:
        print(json.dumps(one_run(*json.loads(cli.one))))
        return
    torch.set_num_threads(1)
    task = TASKS[cli.task]
    setting = task["full"]
    arms = list(DEFAULT_ARMS)
    seeds, steps = SEEDS, STEPS
    if cli.quick:
        setting, arms, seeds = task["quick"], list(QUICK_ARMS), QUICK_SEEDS
        steps = warmup_batches(setting) + QUICK_STEADY
    if cli.smoke:
        setting, arms, seeds, cli.workers = task["smoke"], list(SMOKE_ARMS), 1, 0
        steps = warmup_batches(setting) + 2
    if cli.arms and not cli.smoke:
        arms = cli.arms.split(",")
    alias = shipped_as(setting, arms)
    if "shipped" in arms and alias is not None:
        arms.remove("shipped")
        print(f"shipped: rollout=partial's defaults are the {alias} arm's; not run twice", flush=True)
    seeds, steps = cli.seeds or seeds, cli.steps or steps
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or "full" not in arms or "partial" not in arms:
        parser.error(f"--arms: full and partial are needed, and only {', '.join(ARMS)} exist (got {','.join(arms)})")
    if steps < warmup_batches(setting) + 2:
        parser.error(f"--steps: at least {warmup_batches(setting) + 2} (the warm-up is {warmup_batches(setting)})")
    if cli.workers > 1:
        print(f"--workers {cli.workers}: runs share the machine, so their timings are not comparable", flush=True)

    jobs = []
    for seed in range(seeds):  # a seed's arms back to back, their order rotated by the seed
        shift = seed % len(arms)
        for arm in arms[shift:] + arms[:shift]:
            jobs.append([cli.task, arm, arm_options(arm, setting), seed, steps, setting])
    prefix = task["prefix"]
    cache = None if cli.smoke else RESULTS / f"{prefix}_runs.jsonl"
    if cache is not None and cli.fresh_start:
        cache.unlink(missing_ok=True)
    runs = run_jobs("bench.partial_rollouts", one_run, jobs, cli.workers, cache)

    summary = summarize(runs, arms)
    text = tables(summary)
    print(text)
    befores = [r["before"]["accuracy"] for r in runs if r["before"] is not None]
    start_acc = _mean(befores)
    shipped = "shipped" if "shipped" in summary else (alias or "partial")
    headline = summary[shipped]
    result = {
        "bench": "partial_rollouts",
        "task": cli.task,
        # rollout=partial as shipped (the arm with the same options, when one ran) against full
        "shipped_arm": shipped,
        "throughput_ratio": headline["throughput_ratio"],
        "throughput_ratio_stderr": headline["throughput_ratio_stderr"],
        "generation_throughput_ratio": headline["generation_throughput_ratio"],
        "accuracy_delta": headline["accuracy_delta"],
        "accuracy_delta_stderr": headline["accuracy_delta_stderr"],
        "accuracy_delta_per_seed": headline["accuracy_delta_per_seed"],
        "correction": headline["correction"],
        "max_staleness": headline["max_staleness"],
        "padding_share": headline["decode_padding_share"],
        "train_padding_share": headline["train_padding_share"],
        "ess": headline["ess"],
        "cost_model": headline["cost_model"],
        "accuracy": {arm: b["accuracy"] for arm, b in summary.items()},
        "accuracy_before": _round(start_acc),
        "arms": summary,
        "repeat_false_positive_rate": {
            name: round(statistics.mean(r["repeat_flagged"][name] for r in runs), 4) for name in REPEAT_RULES
        },
        "steps": steps,
        "warmup_batches": warmup_batches(setting),
        "segment_tokens": setting["segment"],
        "max_completion_length": setting["max_tokens"],
        "rows_per_batch": setting["rows"],
        "heldout": setting["heldout"],
        "seeds": seeds,
        "workers": cli.workers,
        "quick": cli.quick,
    }
    if not cli.smoke:
        RESULTS.mkdir(exist_ok=True)
        what = (
            f"{setting['heldout']} held-out chains (k = 2-8)"
            if cli.task == "demo_chain"
            else (f"{setting['heldout']} held-out prompts")
        )
        (RESULTS / f"{prefix}.md").write_text(
            f"# partial_rollouts on {cli.task} ({time.strftime('%Y-%m-%d')}, {machine()}, {cli.workers} run(s) at a "
            f"time)\n\n{steps} rollout batches of {setting['rows'] // 8} prompts x 8, max {setting['max_tokens']} "
            f"tokens, segments of {setting['segment']}, {seeds} paired seeds; steady state after "
            f"{warmup_batches(setting)} batches; greedy accuracy on {what} at the end (start "
            f"{'' if start_acc is None else f'{start_acc:.3f}'}).\n\n{text}\n"
        )
    write_json_line(result, save=not cli.smoke, name=prefix)


if __name__ == "__main__":
    main()
