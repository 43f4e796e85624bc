"""The paper's ablations, from the same warm-started checkpoint and the same sample budget per arm, on one task.

    python -m bench.ablations            # a+b= (tiny_demo): 5 seeds (15 for the length penalty), 80 rollout batches
                                         # per arm: ~45 min on 2 cores, 2 runs at a time
    python -m bench.ablations --quick    # 3 seeds everywhere, 40 rollout batches: ~10 min; the same arms
    python -m bench.ablations --smoke    # seconds; what the test suite runs
    python -m bench.ablations --task demo_chain           # chained addition (tiny_demo_chain): 5 seeds, 20 rollout
                                                          # batches per arm, 700 held-out chains (hours on 2 cores)
    python -m bench.ablations --task demo_chain --quick   # 2 seeds, 8 rollout batches, 140 held-out chains: ~20 min

**The chain task** (``--task demo_chain``, ``data=demo_chain``: ``a1+...+ak=``, k in 2..8, worked answers of 4 to
115 tokens) runs the same ablations where the paper's effects can show, with these differences: the baselines add
TRL's GRPO with the ``grpo`` loss beside its default (``dapo``); a sixth ablation, **reset**, runs k1.5 without the
per-iteration optimizer reset; the curriculum's difficulty is k; the prioritized ablation trains on a fixed pool of
160 chains (so prompts recur and their success rates mean something) with uniform, the paper's priority 1 - s and the
learnability priority s(1 - s), scored on the held-out chains of k = 7-8 ("hard subset", reported for every arm);
the length penalty is measured against the uniform k1.5 arm, on the task's own worked answers. Its files are
results/ablations_demo_chain*; the a+b= files below are left as they are.

Every arm sees rollout batches of 16 prompts x 8 samples; every seed runs every arm (paired: the same seed gives
the same data order), seeds interleaved across the two workers. The ablations:

1. **negative gradients**: k1.5 mirror descent (tau 1, 2 passes per rollout batch, optimizer reset) against ReST,
   iterated fine-tuning on the correct samples only (advantage 1 for a correct sample, 0 otherwise, no baseline, no
   KL term), in the same regime;
2. **k1.5 against the host baselines**: k1.5 at tau 0.25 / 1 / 4 (paper regime) against TRL's GRPO, Dr. GRPO and
   RLOO, each with 1 optimizer step or 2 passes per rollout batch, each at its better setting;
3. **curriculum**: uniform against the staged (all, then the hardest half from half-way) and gradual (easiest 30 %
   widening to all by half-way) curricula; difficulty = 1 - the start checkpoint's pass rate over 8 samples, the
   labels ``k15-curate difficulty`` makes (the demo's carry counts do not rank what this model finds hard: it
   answers two-carry sums more often than the average);
4. **prioritized**: uniform against prioritized sampling on a set where a fifth of the problems is hard (never
   solved in 8 samples by the start checkpoint, the rest solved at least once): held-out accuracy on the held-out
   problems it never solves, and on all;
5. **length penalty**: k1.5 on the filler variant (answers may be padded with '.') with and without the penalty
   (weight 0.1 after a warm-up of a third of the run, ramp a sixth), in the paper regime (2 passes).

Tables in results/ablations.md, one plot per ablation (results/ablations_<name>.png), finished runs cached in
results/ablations_runs.jsonl (an interrupted run resumes). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time

import torch

from bench.common import (
    RESULTS,
    build_trainer,
    chain_task,
    demo_task,
    machine,
    run_jobs,
    samples_to_target,
    write_json_line,
)

SAMPLES_PER_ROLLOUT = 128
PAPER = {"num_iterations": 2}  # 2 optimizer steps (passes) per rollout batch, optimizer reset (the default)

# name -> (ablation, algorithm, trainer overrides, data). "rest" is ReST (ReSTTrainer below).
ARMS = {
    "k1.5 tau 1": ("negative_gradients", "kimi_md", {"tau": 1.0, **PAPER}, "demo"),
    "ReST": ("negative_gradients", "rest", {"tau": 1e-8, **PAPER}, "demo"),
    "k1.5 tau 0.25": ("baselines", "kimi_md", {"tau": 0.25, **PAPER}, "demo"),
    "k1.5 tau 4": ("baselines", "kimi_md", {"tau": 4.0, **PAPER}, "demo"),
    "GRPO 1 step": ("baselines", "grpo", {}, "demo"),
    "GRPO 2 passes": ("baselines", "grpo", PAPER, "demo"),
    "Dr. GRPO 1 step": ("baselines", "dr_grpo", {}, "demo"),
    "Dr. GRPO 2 passes": ("baselines", "dr_grpo", PAPER, "demo"),
    "RLOO 1 step": ("baselines", "rloo", {}, "demo"),
    "RLOO 2 passes": ("baselines", "rloo", PAPER, "demo"),
    "curriculum staged": ("curriculum", "kimi_md", {**PAPER, "sampler_type": "curriculum"}, "demo"),
    "curriculum gradual": ("curriculum", "kimi_md", {**PAPER, "sampler_type": "curriculum"}, "demo"),
    "hard minority, uniform": ("prioritized", "kimi_md", PAPER, "hard_minority"),
    "hard minority, prioritized": ("prioritized", "kimi_md", {**PAPER, "sampler_type": "prioritized"}, "hard_minority"),
    "length penalty off": ("length_penalty", "kimi_md", PAPER, "filler"),
    "length penalty on": ("length_penalty", "kimi_md", PAPER, "filler"),
}
# The chain task's arms (data "chain": the training chains, "pool": a fixed pool of POOL_SIZE of them).
CHAIN_ARMS = {
    "k1.5 tau 1": ("negative_gradients", "kimi_md", {"tau": 1.0, **PAPER}, "chain"),
    "ReST": ("negative_gradients", "rest", {"tau": 1e-8, **PAPER}, "chain"),
    "k1.5 tau 0.25": ("baselines", "kimi_md", {"tau": 0.25, **PAPER}, "chain"),
    "k1.5 tau 4": ("baselines", "kimi_md", {"tau": 4.0, **PAPER}, "chain"),
    "GRPO 1 step": ("baselines", "grpo", {}, "chain"),  # TRL's defaults: loss dapo
    "GRPO 2 passes": ("baselines", "grpo", PAPER, "chain"),
    "GRPO grpo loss 1 step": ("baselines", "grpo", {"loss_type": "grpo"}, "chain"),
    "GRPO grpo loss 2 passes": ("baselines", "grpo", {"loss_type": "grpo", **PAPER}, "chain"),
    "Dr. GRPO 1 step": ("baselines", "dr_grpo", {}, "chain"),
    "Dr. GRPO 2 passes": ("baselines", "dr_grpo", PAPER, "chain"),
    "RLOO 1 step": ("baselines", "rloo", {}, "chain"),
    "RLOO 2 passes": ("baselines", "rloo", PAPER, "chain"),
    "k1.5 no reset": ("reset", "kimi_md", {"tau": 1.0, **PAPER, "reset_optimizer_each_iteration": False}, "chain"),
    "curriculum staged": ("curriculum", "kimi_md", {**PAPER, "sampler_type": "curriculum"}, "chain"),
    "curriculum gradual": ("curriculum", "kimi_md", {**PAPER, "sampler_type": "curriculum"}, "chain"),
    "pool, uniform": ("prioritized", "kimi_md", PAPER, "pool"),
    "pool, prioritized 1 - s": ("prioritized", "kimi_md", {**PAPER, "sampler_type": "prioritized"}, "pool"),
    "pool, prioritized s(1 - s)": (
        "prioritized",
        "kimi_md",
        {**PAPER, "sampler_type": "prioritized", "prioritized_priority": "learnability"},
        "pool",
    ),
    "length penalty on": ("length_penalty", "kimi_md", PAPER, "chain"),
}
TASK_ARMS = {"demo": ARMS, "demo_chain": CHAIN_ARMS}
K15_DEFAULT = "k1.5 tau 1"  # also the uniform arm of the curriculum ablation and the k1.5 tau-1 point of the grid
BASELINES = {
    "GRPO": ("GRPO 1 step", "GRPO 2 passes"),
    "Dr. GRPO": ("Dr. GRPO 1 step", "Dr. GRPO 2 passes"),
    "RLOO": ("RLOO 1 step", "RLOO 2 passes"),
}
CHAIN_BASELINES = {
    "GRPO": ("GRPO 1 step", "GRPO 2 passes"),
    "GRPO grpo loss": ("GRPO grpo loss 1 step", "GRPO grpo loss 2 passes"),
    **{b: arms for b, arms in BASELINES.items() if b != "GRPO"},
}
K15_GRID = ("k1.5 tau 0.25", K15_DEFAULT, "k1.5 tau 4")
HARD_SHARE = 0.2
# Per task: the prioritized ablation's arms (uniform, the paper's priority, learnability or None) and the length
# penalty's (off, on).
PRIORITIZED_ARMS = {
    "demo": ("hard minority, uniform", "hard minority, prioritized", None),
    "demo_chain": ("pool, uniform", "pool, prioritized 1 - s", "pool, prioritized s(1 - s)"),
}
LENGTH_PENALTY_ARMS = {
    "demo": ("length penalty off", "length penalty on"),
    "demo_chain": (K15_DEFAULT, "length penalty on"),
}
POOL_SIZE = 160  # chains in the prioritized ablation's pool: 10 rollout batches' worth, so each recurs
HARD_K = 7  # the chain's hard subset: held-out chains of at least this many terms


def rest_trainer_cls():
    """ReST on the k1.5 trainer: advantage 1 for a correct sample, 0 otherwise (fine-tuning on the correct samples,
    no baseline, so no negative gradient); the arm's tiny tau removes the squared term."""
    from k15_plugin import KimiMirrorDescentTrainer

    class ReSTTrainer(KimiMirrorDescentTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            weights = self.reward_weights.to(self._k15_gathered_rewards.device)
            rewards = (self._k15_gathered_rewards * weights).nansum(dim=1)  # (N,) gathered, as the parent reads them
            local = len(output["prompt_ids"])
            start = self.accelerator.process_index * local
            output["advantages"] = (rewards >= 1.0).to(output["advantages"].dtype)[start : start + local]
            return output

    return ReSTTrainer


@torch.no_grad()
def pass_rates(model, tokenizer, ds, samples: int = 8, batch: int = 500) -> list[float]:
    """Each problem's pass rate over ``samples`` sampled answers of ``model`` (temperature 1, as in training): the
    labels ``k15-curate difficulty`` makes, computed in place for the demo checkpoint (seed 0, fixed)."""
    from k15_plugin.data.arithmetic import ArithmeticReward

    reward = ArithmeticReward(tokenizer)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    rates = []
    prompts, answers = list(ds["prompt"]), list(ds["answer"])
    for start in range(0, len(prompts), batch):
        enc = tokenizer(prompts[start : start + batch], return_tensors="pt", padding=True)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=4,
            num_return_sequences=samples,
            pad_token_id=tokenizer.pad_token_id,
        )
        ids = out[:, enc["input_ids"].shape[1] :].tolist()
        for i, answer in enumerate(answers[start : start + batch]):
            rates.append(statistics.mean(reward.score(c, answer) for c in ids[i * samples : (i + 1) * samples]))
    torch.random.set_rng_state(generator_state)
    return rates


DIFFICULTY_FILE = RESULTS / "ablations_difficulty.json"


def difficulty_labels(model, tokenizer) -> dict[str, float]:
    """prompt -> 1 - the start checkpoint's pass rate, for all 10,000 demo problems; computed once (about 20 s) and
    kept in results/ablations_difficulty.json, which ships with the repository."""
    if DIFFICULTY_FILE.exists():
        return json.loads(DIFFICULTY_FILE.read_text())
    from datasets import Dataset

    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(100) for b in range(100)]
    rates = pass_rates(model, tokenizer, Dataset.from_list(rows))
    labels = {r["prompt"]: 1.0 - p for r, p in zip(rows, rates, strict=True)}
    DIFFICULTY_FILE.parent.mkdir(exist_ok=True)
    tmp = DIFFICULTY_FILE.with_name(f"{DIFFICULTY_FILE.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(labels))
    os.replace(tmp, DIFFICULTY_FILE)
    return labels


def _with_difficulty(ds, model, tokenizer):
    """``difficulty`` = 1 - the start checkpoint's pass rate (higher is harder)."""
    labels = difficulty_labels(model, tokenizer)
    return ds.add_column("difficulty", [labels[p] for p in ds["prompt"]])


def hard_minority(train, seed: int):
    """Problems the start checkpoint solves at least once in 8 samples, plus a fifth of ones it never solves."""
    hard = train.filter(lambda r: r["difficulty"] == 1.0)
    easy = train.filter(lambda r: r["difficulty"] < 1.0)
    n_hard = min(len(hard), int(len(easy) * HARD_SHARE / (1 - HARD_SHARE)))
    from datasets import concatenate_datasets

    return concatenate_datasets([easy, hard.select(range(n_hard))]).shuffle(seed=seed)


def _schedule(name: str, steps: int) -> dict:
    """Arm-specific settings that depend on the run length (in optimizer steps)."""
    if name == "curriculum staged":
        return {"curriculum_schedule": "staged", "curriculum_switch_step": steps // 2, "curriculum_hard_fraction": 0.5}
    if name == "curriculum gradual":
        return {"curriculum_schedule": "gradual", "curriculum_start_fraction": 0.3, "curriculum_ramp_steps": steps // 2}
    if name == "length penalty on":
        return {
            "length_penalty_weight": 0.1,
            "length_penalty_warmup_steps": steps // 3,
            "length_penalty_ramp_steps": max(1, steps // 6),
        }
    return {}


def chain_evaluate(model, tokenizer, heldout) -> dict:
    """Greedy held-out accuracy on the chain task, overall, on the hard subset (k >= HARD_K) and per k, and the mean
    completion length (tokens, EOS included)."""
    from k15_plugin.data.arithmetic import greedy_scores, mean_by
    from k15_plugin.data.chain import max_new_tokens

    right, ids = greedy_scores(model, tokenizer, heldout, max_new_tokens(), prompts_per_batch=500, allow_steps=True)
    ks = list(heldout["difficulty"])
    return {
        "accuracy": statistics.mean(right),
        "hard_accuracy": statistics.mean(r for r, k in zip(right, ks, strict=True) if k >= HARD_K),
        "accuracy_by_k": {str(k): round(v, 4) for k, v in mean_by(right, ks).items()},
        "mean_completion_tokens": statistics.mean(map(len, ids)),
    }


def one_run(
    name: str,
    seed: int,
    rollouts: int,
    eval_every: int,
    task: str = "demo",
    heldout_size: int = 700,
    smoke: bool = False,
) -> dict:
    """One arm, one seed: held-out curve (accuracy against samples) and final metrics. ``smoke`` (chain task):
    rollout batches of 2 prompts x 8 samples of at most 24 tokens, 200 training chains: only that it runs."""
    from k15_plugin.data.arithmetic import evaluate_greedy

    torch.set_num_threads(1)
    _, algorithm, overrides, data = TASK_ARMS[task][name]
    filler = data == "filler"
    if task == "demo_chain":
        from k15_plugin.data.chain import max_new_tokens

        model, tokenizer, train, heldout, rewards = chain_task(seed, heldout_size, num_train=200 if smoke else 10_000)
        if data == "pool":
            train = train.select(range(min(POOL_SIZE, len(train))))
        extra = {"max_completion_length": max_new_tokens()}
        if smoke:
            extra = {"max_completion_length": 24, "per_device_train_batch_size": 16}
    else:
        model, tokenizer, train, heldout, rewards = demo_task(seed, filler=filler)
        extra = {"max_completion_length": 10} if filler else {}
    if task == "demo" and (data == "hard_minority" or overrides.get("sampler_type") == "curriculum"):
        train = _with_difficulty(train, model, tokenizer)
    if data == "hard_minority":
        train = hard_minority(train, seed)
        heldout = _with_difficulty(heldout, model, tokenizer)
    hard_heldout = heldout.filter(lambda r: r["difficulty"] == 1.0) if data == "hard_minority" else None
    updates = overrides.get("num_iterations", 1)  # optimizer steps per rollout batch
    steps = rollouts * updates

    def evaluate(m) -> dict:
        if task == "demo_chain":
            return chain_evaluate(m, tokenizer, heldout)
        result = evaluate_greedy(m, tokenizer, heldout, allow_filler=filler)
        if data == "hard_minority":
            result["hard_accuracy"] = evaluate_greedy(m, tokenizer, hard_heldout)["accuracy"]
        return result

    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % (eval_every * updates) == 0 and state.global_step < state.max_steps:
                points.append({"samples": state.global_step // updates * SAMPLES_PER_ROLLOUT, **evaluate(model)})

    points = [{"samples": 0, **evaluate(model)}]
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(
            "kimi_md" if algorithm == "rest" else algorithm,
            model,
            tokenizer,
            train,
            rewards,
            tmp,
            callbacks=[Curve()],
            seed=seed,
            max_steps=steps,
            logging_steps=steps,
            trainer_cls=rest_trainer_cls() if algorithm == "rest" else None,
            **overrides,
            **_schedule(name, steps),
            **extra,
        )
        trainer.train()
    final = evaluate(trainer.model)
    points.append({"samples": rollouts * SAMPLES_PER_ROLLOUT, **final})
    return {"name": name, "seed": seed, "seconds": time.time() - start, "final": final, "curve": points}


# ----------------------------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------------------------


def _mean(xs):
    return statistics.mean(xs) if xs else float("nan")


def _stderr(xs):
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def _finals(runs, name, key="accuracy"):
    return [r["final"][key] for r in sorted((r for r in runs if r["name"] == name), key=lambda r: r["seed"])]


def _paired(runs, a, b, key="accuracy"):
    """Per-seed a - b (same seeds)."""
    return [x - y for x, y in zip(_finals(runs, a, key), _finals(runs, b, key), strict=True)]


def _samples_to(runs, name, target):
    reached = [samples_to_target(r, target) for r in runs if r["name"] == name]
    return _mean(reached) if all(x is not None for x in reached) else None


def summarize(runs: list[dict], target: float, task: str = "demo") -> dict:
    """The ablations' figures (paired differences over seeds, as fractions) from the finished runs of ``task``."""
    r = lambda x: None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, 4)  # noqa: E731
    out = {}
    gap = _paired(runs, K15_DEFAULT, "ReST")
    out["opmd_vs_rest"] = {
        "opmd_accuracy": r(_mean(_finals(runs, K15_DEFAULT))),
        "rest_accuracy": r(_mean(_finals(runs, "ReST"))),
        "difference": r(_mean(gap)),
        "difference_stderr": r(_stderr(gap)),
        "target_accuracy": target,
        "opmd_samples_to_target": r(_samples_to(runs, K15_DEFAULT, target)),
        "rest_samples_to_target": r(_samples_to(runs, "ReST", target)),
    }
    best_k15 = max(K15_GRID, key=lambda n: _mean(_finals(runs, n)))
    baselines = CHAIN_BASELINES if task == "demo_chain" else BASELINES
    best_of = {b: max(arms, key=lambda n: _mean(_finals(runs, n))) for b, arms in baselines.items()}
    best_baseline = max(best_of.values(), key=lambda n: _mean(_finals(runs, n)))
    gap = _paired(runs, best_k15, best_baseline)
    out["k15_vs_grpo"] = {
        "k15_accuracy": r(_mean(_finals(runs, best_k15))),
        "k15_best_setting": best_k15,
        "grpo_accuracy": r(_mean(_finals(runs, best_of["GRPO"]))),
        "grpo_best_setting": best_of["GRPO"],
        "best_baseline": best_baseline,
        "best_baseline_accuracy": r(_mean(_finals(runs, best_baseline))),
        "difference": r(_mean(gap)),
        "difference_stderr": r(_stderr(gap)),
        "baselines": {b: {"setting": n, "accuracy": r(_mean(_finals(runs, n)))} for b, n in best_of.items()},
    }
    out["curriculum_vs_uniform"] = {
        "uniform_accuracy": r(_mean(_finals(runs, K15_DEFAULT))),
        "curriculum_accuracy": r(max(_mean(_finals(runs, n)) for n in ("curriculum staged", "curriculum gradual"))),
        "staged_accuracy": r(_mean(_finals(runs, "curriculum staged"))),
        "gradual_accuracy": r(_mean(_finals(runs, "curriculum gradual"))),
        "staged_difference_stderr": r(_stderr(_paired(runs, "curriculum staged", K15_DEFAULT))),
        "gradual_difference_stderr": r(_stderr(_paired(runs, "curriculum gradual", K15_DEFAULT))),
    }
    u, p, learn = PRIORITIZED_ARMS[task]
    out["prioritized_vs_uniform"] = {
        "uniform_hard_accuracy": r(_mean(_finals(runs, u, "hard_accuracy"))),
        "prioritized_hard_accuracy": r(_mean(_finals(runs, p, "hard_accuracy"))),
        "hard_difference_stderr": r(_stderr(_paired(runs, p, u, "hard_accuracy"))),
        "uniform_accuracy": r(_mean(_finals(runs, u))),
        "prioritized_accuracy": r(_mean(_finals(runs, p))),
        "difference_stderr": r(_stderr(_paired(runs, p, u))),
    }
    if learn is not None:
        out["prioritized_vs_uniform"].update(
            {
                "hard_difference": r(_mean(_paired(runs, p, u, "hard_accuracy"))),
                "difference": r(_mean(_paired(runs, p, u))),
                "learnability_hard_accuracy": r(_mean(_finals(runs, learn, "hard_accuracy"))),
                "learnability_hard_difference": r(_mean(_paired(runs, learn, u, "hard_accuracy"))),
                "learnability_hard_difference_stderr": r(_stderr(_paired(runs, learn, u, "hard_accuracy"))),
                "learnability_accuracy": r(_mean(_finals(runs, learn))),
                "learnability_difference": r(_mean(_paired(runs, learn, u))),
                "learnability_difference_stderr": r(_stderr(_paired(runs, learn, u))),
            }
        )
    off, on = LENGTH_PENALTY_ARMS[task]
    tokens = _mean(_finals(runs, on, "mean_completion_tokens")) / _mean(_finals(runs, off, "mean_completion_tokens"))
    gap = _paired(runs, on, off)
    out["length_penalty"] = {
        "tokens_ratio": r(tokens),
        "accuracy_delta": r(_mean(gap)),
        "accuracy_delta_stderr": r(_stderr(gap)),
        "accuracy_delta_per_seed": [r(x) for x in gap],
        "accuracy_off": r(_mean(_finals(runs, off))),
        "tokens_off": r(_mean(_finals(runs, off, "mean_completion_tokens"))),
        "tokens_on": r(_mean(_finals(runs, on, "mean_completion_tokens"))),
        "seeds": len(gap),
    }
    if task == "demo_chain":
        gap = _paired(runs, K15_DEFAULT, "k1.5 no reset")
        out["optimizer_reset"] = {
            "reset_accuracy": r(_mean(_finals(runs, K15_DEFAULT))),
            "no_reset_accuracy": r(_mean(_finals(runs, "k1.5 no reset"))),
            "difference": r(_mean(gap)),
            "difference_stderr": r(_stderr(gap)),
        }
        for key in ("curriculum staged", "curriculum gradual"):
            gap = _paired(runs, key, K15_DEFAULT)
            out["curriculum_vs_uniform"][f"{key.split()[1]}_difference"] = r(_mean(gap))
            hard = _paired(runs, key, K15_DEFAULT, "hard_accuracy")
            out["curriculum_vs_uniform"][f"{key.split()[1]}_hard_difference"] = r(_mean(hard))
            out["curriculum_vs_uniform"][f"{key.split()[1]}_hard_difference_stderr"] = r(_stderr(hard))
    return out


def table(runs: list[dict], names: list[str]) -> str:
    """The markdown table of ``names``' finished runs."""
    lines = [
        "| arm | seeds | held-out accuracy, mean (min-max) | hard subset | greedy tokens | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        acc = _finals(runs, name)
        hard = [r["final"]["hard_accuracy"] for r in runs if r["name"] == name and "hard_accuracy" in r["final"]]
        tokens = _finals(runs, name, "mean_completion_tokens")
        secs = _mean([r["seconds"] for r in runs if r["name"] == name])
        hard_text = f"{_mean(hard):.3f}" if hard else ""
        lines.append(
            f"| {name} | {len(acc)} | {_mean(acc):.3f} ({min(acc):.3f}-{max(acc):.3f}) | {hard_text} | "
            f"{_mean(tokens):.2f} | {secs:.0f} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], names: list[str], path, key: str = "accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in names:
        mine = [r for r in runs if r["name"] == name]
        xs = [p["samples"] for p in mine[0]["curve"]]
        ys = list(zip(*([p.get(key, p["accuracy"]) for p in r["curve"]] for r in mine), strict=True))
        ax.plot(xs, [statistics.mean(y) for y in ys], label=name)
        ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.15)
    ax.set_xlabel("samples")
    ax.set_ylabel(f"held-out greedy {key.replace('_', ' ')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    """Run (or resume) the ablations of ``--task``, write their tables, plots and JSON, print the JSON line last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASK_ARMS), default="demo", help="demo (a+b=) or demo_chain")
    parser.add_argument("--rollouts", type=int, help="rollout batches per arm (the sample budget); 80, chain 20")
    parser.add_argument("--eval-every", type=int, default=10, help="rollout batches between held-out evaluations")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--heldout", type=int, default=700, help="chain task: held-out chains (the same number per k)")
    parser.add_argument("--target", type=float, help="accuracy for the samples-to-target figures; 0.35, chain 0.33")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, each in its own process")
    parser.add_argument(
        "--more-seeds",
        nargs="*",
        metavar="ABLATION=N",
        help="seeds in all for an ablation whose spread needs more than --seeds (default: length_penalty=15 on demo)",
    )
    parser.add_argument("--quick", action="store_true", help="3 seeds, 40 rollout batches (chain: 2, 8, 140 held out)")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 1 rollout batch per arm, nothing saved")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run in this process
    cli = parser.parse_args()
    if cli.one:
        print(json.dumps(one_run(*json.loads(cli.one))))
        return
    torch.set_num_threads(1)
    chain = cli.task == "demo_chain"
    if cli.rollouts is None:
        cli.rollouts = 20 if chain else 80
    if cli.target is None:
        cli.target = 0.33 if chain else 0.35
    if cli.more_seeds is None:
        cli.more_seeds = [] if chain else ["length_penalty=15"]
    if cli.quick:
        cli.seeds, cli.rollouts, cli.more_seeds = (2, 8, []) if chain else (3, 40, [])
        if chain:
            cli.eval_every, cli.heldout = 4, 140
    if cli.smoke:
        cli.seeds, cli.rollouts, cli.eval_every, cli.workers, cli.more_seeds = 1, 1, 1, 0, []
        if chain:
            cli.heldout = 14
    arms = TASK_ARMS[cli.task]
    names = list(arms)
    # The chain's jobs name the task and held-out size; the a+b= jobs keep their old form (and cache).
    tail = [cli.task, cli.heldout, *([True] if cli.smoke else [])] if chain else []
    jobs = [[n, s, cli.rollouts, cli.eval_every, *tail] for s in range(cli.seeds) for n in names]
    for item in cli.more_seeds:
        ablation, _, count = item.partition("=")
        if ablation not in {a for a, *_ in arms.values()} or not count.isdigit():
            parser.error(f"--more-seeds {item}: expected ABLATION=N with ABLATION one of the ablations")
        more = [n for n in names if arms[n][0] == ablation]
        jobs += [[n, s, cli.rollouts, cli.eval_every, *tail] for s in range(cli.seeds, int(count)) for n in more]
    prefix = "ablations" if cli.task == "demo" else f"ablations_{cli.task}"
    cache = None if cli.smoke else RESULTS / f"{prefix}_runs.jsonl"
    runs = run_jobs("bench.ablations", one_run, jobs, cli.workers, cache=cache)
    summary = summarize(runs, cli.target, cli.task)
    sections = []
    for ablation in dict.fromkeys(a for a, *_ in arms.values()):
        shown = [n for n in names if arms[n][0] == ablation]
        if ablation in ("curriculum", "reset") or (chain and ablation == "length_penalty"):
            shown = [K15_DEFAULT, *shown]
        sections.append(f"### {ablation}\n\n{table(runs, shown)}\n")
        if not cli.smoke:
            plot(
                runs,
                shown,
                RESULTS / f"{prefix}_{ablation}.png",
                "hard_accuracy" if ablation == "prioritized" else "accuracy",
            )
    text = "\n".join(sections)
    print(text)
    what = f"{cli.heldout} held-out chains (k = 2-8)" if chain else "500 prompts"
    if not cli.smoke:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{prefix}.md").write_text(
            f"# ablations on {cli.task} ({time.strftime('%Y-%m-%d')}, {machine()}, {cli.workers} runs at a time)\n\n"
            f"{cli.rollouts} rollout batches x {SAMPLES_PER_ROLLOUT} samples per arm, {cli.seeds} seeds (more where "
            f"listed: {' '.join(cli.more_seeds) or 'none'}); held-out greedy accuracy on {what} at the end.\n\n"
            f"{text}\n\n```json\n{json.dumps(summary, indent=2)}\n```\n"
        )
    write_json_line(
        {
            "bench": "ablations",
            **summary,
            "seeds": cli.seeds,
            "rollouts": cli.rollouts,
            "quick": cli.quick,
            **({"task": cli.task} if chain else {}),
        },
        save=not cli.smoke,
        name=prefix,
    )


if __name__ == "__main__":
    main()
