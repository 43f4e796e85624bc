"""long2short (paper section 2.4, Fig. 7): every method from the same long model, on a demo task where long answers
help.

    python -m bench.long2short                            # three-term task, 3 seeds, 2 jobs at a time: ~15 min
    python -m bench.long2short --task demo_chain          # chain task, 5 seeds: 54 min (+ ~8 min the first time)
    python -m bench.long2short --task demo_chain --quick  # chain task, 1 seed, fewer prompts and steps: ~20 min
    python -m bench.long2short [--task T] --smoke         # a minute or two; what the test suite runs

(times on 2 shared cores; the chain's include building its long and short model once, ~7 min, reused afterwards).
The tasks (``--task``):

* ``demo_sum3`` (the default): ``a+b+c=`` (``k15_plugin.data.sum3``). The long model is the shipped
  ``tiny_demo_sum3_long``: greedy decoding restates the problem and writes the partial sum before the answer, ~19
  tokens; answering directly is far less accurate. The short model is the shipped ``tiny_demo_sum3_short`` (the long
  one fine-tuned on direct answers). Budget 20 tokens; long2short RL cuts completions at 11.
* ``demo_chain``: ``a1+...+ak=``, k in 2..8 (``k15_plugin.data.chain``). The long and the short model are made from
  the shipped ``tiny_demo_chain`` by ``k15_plugin.data.build.make_chain_long2short_checkpoints`` (long: fine-tuned
  mostly on answers that restate the rest of the sum after each addition, up to 115 tokens; short: the long one
  fine-tuned on running sums and direct answers), built once into the work directory (a few minutes on one thread)
  and reused while their recipe is unchanged. Budget 115 tokens (the task's longest answer, EOS included);
  long2short RL cuts completions at 46 (every running-sum answer fits, restated answers from k = 5 on do not).

Per seed (paired: every method of a seed starts from the same samples and data order), through the
``k15-long2short`` commands and ``k15-train``:

* **merge**: the long model averaged 0.5/0.5 with the short model, by mergekit (the paper's "simply averaging");
  **merge 0.75**: weight 0.75 on the long model (ours);
* **merge + RS**: shortest rejection sampling applied to the merged model (the paper's "merge + rs");
* **shortest RS**: 8 samples per training prompt from the long model, the shortest correct one per prompt, SFT of the
  long model on those (TRL SFTTrainer); control **RS random**: a random correct sample instead of the shortest;
* **DPO**: the paper's: the shortest correct sample against a longer one (a wrong sample longer than it, or a correct
  one at least 1.5x longer), the sigmoid DPO loss alone (TRL DPOTrainer); **DPO + SFT** (ours, not in the paper):
  the same pairs, plus an SFT term on the chosen answer;
* **long2short RL**: ``k15-train experiment=long2short_rl`` (k1.5 with the length penalty, completions cut short);
  control **RL no penalty**: the same run without the penalty and with the long model's own limit.

Held-out evaluation: sampled accuracy (pass@1 over samples per prompt at temperature 1, the paper's Fig. 7 measure)
and mean answer tokens (EOS included), and the same for greedy decoding (the chain's held-out prompts are taken evenly
over k). "best" is the method (controls aside) with the fewest sampled tokens among those within 2 points (0.02) of the
long model's sampled accuracy (means over paired seeds). Accuracy deltas are fractions in the JSON, points in the
table. Results: results/long2short.json, .md, .png for demo_sum3, results/long2short_demo_chain.* for demo_chain
(``--quick``: results/long2short_demo_chain_quick.*); finished jobs cached in results/<same name>_runs.jsonl (an
interrupted run resumes; delete it to measure again). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import RESULTS, machine, run_jobs, write_json_line

WORK = Path(os.environ.get("K15_BENCH_WORK", "/tmp/k15_bench_long2short"))
METHODS = [
    "merge",
    "merge 0.75",
    "merge + RS",
    "shortest RS",
    "RS random",
    "DPO",
    "DPO + SFT",
    "long2short RL",
    "RL no penalty",
]
CONTROLS = {"RS random", "RL no penalty"}
# The methods as the paper describes them; the others are our variants (merge 0.75, DPO + SFT) or controls.
PAPER = {"merge", "merge + RS", "shortest RS", "DPO", "long2short RL"}
LABELS = {
    "merge 0.75": "merge 0.75 (ours: weight 0.75 on the long model)",
    "DPO": "DPO (paper: sigmoid loss only)",
    "DPO + SFT": "DPO + SFT (ours, not in the paper)",
    **{name: f"{name} (control)" for name in CONTROLS},
}
DPO_LOSSES = {"DPO": "sigmoid", "DPO + SFT": "sigmoid,sft"}
DPO_RULE = "paper"  # build-dpo --rule: the paper's negatives (longer wrong answers, correct ones 1.5x longer)
# The paper's Fig. 7 measure: Pass@1 averaged over sampled runs, against mean tokens. Greedy is reported alongside.
PRIMARY = "sampled"
ACCURACY_SLACK = 0.02  # "best": within 2 points of the long model's sampled accuracy


@dataclass(frozen=True)
class Task:
    """A task the benchmark runs on: its models, its limits and its sizes."""

    title: str
    stem: str  # results/<stem>.json, .md, .png, _runs.jsonl
    long: str | None  # a shipped model's name; None: built into the work directory (make_chain_long2short_checkpoints)
    short: str | None
    long_limit: int  # the long model's generation budget: RL no penalty's completion limit
    rl_limit: int  # long2short RL's completion limit
    rl_overrides: tuple[str, ...]  # k15-train overrides on top of experiment=long2short_rl
    tokens_ratio_target: float  # the JSON's target: the best method at most this share of the long model's tokens
    sizes: dict = field(default_factory=dict)  # full, quick, smoke


TASKS = {
    "demo_sum3": Task(
        title="the three-term demo task",
        stem="long2short",
        long="tiny_demo_sum3_long",
        short="tiny_demo_sum3_short",
        long_limit=20,
        rl_limit=11,  # conf/experiment/long2short_rl.yaml's own
        rl_overrides=(),
        tokens_ratio_target=0.55,
        sizes={
            "full": {"prompts": 4000, "merge_prompts": 2000, "rl_steps": 400, "heldout": 500, "sampled": 8, "seeds": 3},
            "quick": {"prompts": 1000, "merge_prompts": 500, "rl_steps": 100, "heldout": 250, "sampled": 4, "seeds": 1},
            "smoke": {"prompts": 16, "merge_prompts": 8, "rl_steps": 2, "heldout": 16, "sampled": 1, "seeds": 1},
        },
    ),
    "demo_chain": Task(
        title="the chain task (a1+...+ak=, k in 2..8)",
        stem="long2short_demo_chain",
        long=None,
        short=None,
        long_limit=115,  # k15_plugin.data.chain.max_new_tokens(): k = 8 restated, EOS included
        rl_limit=46,  # the longest running-sum answer (k = 8) with EOS; restated answers from k = 5 on are cut
        rl_overrides=("data=demo_chain",),
        tokens_ratio_target=0.6,  # set with the chain testbed, before its first run
        sizes={
            # Generation dominates here (a batch decodes until its longest answer ends, often at 115 tokens): fewer
            # prompts and 4 samples per held-out prompt, not 8. heldout: 40 per k (quick: 20).
            "full": {"prompts": 1000, "merge_prompts": 500, "rl_steps": 200, "heldout": 280, "sampled": 4, "seeds": 5},
            "quick": {"prompts": 400, "merge_prompts": 200, "rl_steps": 60, "heldout": 140, "sampled": 4, "seeds": 1},
            "smoke": {
                "prompts": 32,  # enough for a prompt with a correct sample and a longer one
                "merge_prompts": 4,
                "rl_steps": 2,
                "heldout": 14,
                "sampled": 1,
                "seeds": 1,
                "build": {"long_steps": 2, "short_steps": 2, "measure_size": 7},
            },
        },
    ),
}


def _root(task: str, mode: str) -> Path:
    """The work directory of a task and mode (the three-term task's full run keeps the top level, as it always has)."""
    if task == "demo_sum3" and mode != "quick":
        return WORK
    return WORK / (task + ("_quick" if mode == "quick" else ""))


def build_models(task: str, mode: str, size: dict) -> dict:
    """The task's long and short models: ``{"long", "short"}`` (paths or names) and, for a built pair, ``"built"``
    (what the maker recorded, ``reused`` when it was already there)."""
    spec = TASKS[task]
    if spec.long is not None:
        return {"long": spec.long, "short": spec.short}
    import torch

    from k15_plugin.data.build.make_chain_long2short_checkpoints import build

    torch.set_num_threads(1)
    # shared by the quick and the full run (the maker reuses a pair of the same recipe); the smoke run's is its own
    root = WORK / f"{task}_models" if mode != "smoke" else _root(task, mode) / "models"
    out_long, out_short = root / "long", root / "short"
    start = time.time()
    info = build(out_long, out_short, **size.get("build", {}))
    keep = ("heldout", "seconds", "threads")
    built = {
        "reused": info["reused"],
        "recipe": info["long"]["recipe"],
        "seconds": round(time.time() - start, 1),
        **{name: {k: info[name][k] for k in keep if k in info[name]} for name in ("long", "short")},
    }
    return {"long": str(out_long), "short": str(out_short), "built": built}


def _l2s(args: list[str]) -> dict:
    from k15_plugin.long2short.cli import run

    quiet = ["--quiet"] if args[0] in ("sample", "eval", "sft", "dpo") else []
    overwrite = ["--overwrite"] if args[0] in ("merge", "sft", "dpo") else []  # the work directory is ours
    return run([*args, *quiet, *overwrite])


def _sft(name: str, model: str, samples: Path, d: Path, select: str, seed: int) -> str:
    rows = d / f"{name}.jsonl"
    _l2s(["build-sft", "--samples", str(samples), "--output", str(rows), "--select", select, "--seed", str(seed)])
    _l2s(
        [
            "sft",
            "--model",
            model,
            "--data",
            str(rows),
            "--output",
            str(d / name),
            "--seed",
            str(seed),
            "--learning-rate",
            "1e-4",
        ]
    )
    return str(d / name)


def _sample(model: str, task: str, prompts: int, seed: int, output: Path) -> dict:
    return _l2s(
        [
            "sample",
            "--model",
            model,
            "--task",
            task,
            "--num-prompts",
            str(prompts),
            "--seed",
            str(seed),
            "--output",
            str(output),
        ]
    )


def offline(seed: int, size: dict, rule: str, task: str, mode: str, pair: dict) -> dict:
    """One seed's sampling-based methods; returns {method: model dir} and the sampling statistics."""
    d = _root(task, mode) / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    long, short = pair["long"], pair["short"]
    out: dict = {"models": {}, "stats": {}}
    merged = str(d / "merge")
    _l2s(["merge", "--long", long, "--short", short, "--output", merged])
    out["models"]["merge"] = merged
    _l2s(["merge", "--long", long, "--short", short, "--output", str(d / "merge_075"), "--weight-long", "0.75"])
    out["models"]["merge 0.75"] = str(d / "merge_075")
    samples = d / "samples.jsonl"
    sampled = _sample(long, task, size["prompts"], seed, samples)
    out["stats"]["samples"] = {k: sampled[k] for k in ("accuracy", "mean_tokens", "prompts_with_correct")}
    out["models"]["shortest RS"] = _sft("rs", long, samples, d, "shortest", seed)
    out["models"]["RS random"] = _sft("rs_random", long, samples, d, "random", seed)
    pairs = d / "pairs.jsonl"
    out["stats"]["pairs"] = _l2s(
        ["build-dpo", "--samples", str(samples), "--output", str(pairs), "--seed", str(seed), "--rule", rule]
    )
    for name, loss in DPO_LOSSES.items():
        target = d / ("dpo" if name == "DPO" else "dpo_sft")
        _l2s(
            ["dpo", "--model", long, "--data", str(pairs), "--output", str(target), "--loss", loss, "--seed", str(seed)]
        )
        out["models"][name] = str(target)
    merge_samples = d / "merge_samples.jsonl"
    _sample(merged, task, size["merge_prompts"], seed, merge_samples)
    out["models"]["merge + RS"] = _sft("merge_rs", merged, merge_samples, d, "shortest", seed)
    return out


def rl(seed: int, arm: str, size: dict, task: str, mode: str, pair: dict) -> dict:
    """A second RL phase from the long model through k15-train; returns {method: final model dir}."""
    spec = TASKS[task]
    run_dir = _root(task, mode) / f"seed{seed}" / ("rl" if arm == "long2short RL" else "rl_no_penalty")
    overrides = [
        *spec.rl_overrides,
        f"seed={seed}",
        f"trainer.max_steps={size['rl_steps']}",
        "trainer.eval_steps=100000",
        "trainer.report_to=[]",
        f"hydra.run.dir={run_dir}",
        "trainer.eval_size=16",
    ]
    if spec.long is None:
        overrides.append(f"model.path={pair['long']}")
    if arm == "RL no penalty":
        overrides += ["reward=correctness", f"trainer.max_completion_length={spec.long_limit}"]
    else:
        overrides.append(f"trainer.max_completion_length={spec.rl_limit}")
    if size.get("smoke"):
        overrides += ["trainer.per_device_train_batch_size=16", "data.num_train=64"]
    summary = run_dir / "summary.json"
    if not summary.is_file():
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        done = subprocess.run(
            [sys.executable, "-m", "k15_plugin.cli.train", "experiment=long2short_rl", *overrides],
            capture_output=True,
            text=True,
            env=env,
        )
        if done.returncode != 0:
            raise RuntimeError(f"k15-train failed:\n{done.stderr[-3000:]}")
    return {"models": {arm: json.loads(summary.read_text())["final_model"]}}


def evaluate(seed: int, part: int, models: dict, size: dict, task: str, mode: str, pair: dict) -> list[dict]:
    """Models of a seed on the same held-out prompts, one row per model: part 0 also evaluates the long and the short
    model. The parts run as separate jobs, so two workers share a seed's evaluation; a model's samples do not depend
    on which part it is in (every model's chunks are seeded alike)."""
    out = _root(task, mode) / f"seed{seed}" / f"eval_{part}.jsonl"
    refs = [f"long={pair['long']}", f"short={pair['short']}"] if part == 0 else []
    names = [*refs, *(f"{name}={path}" for name, path in models.items())]
    _l2s(
        [
            "eval",
            "--models",
            *names,
            "--task",
            task,
            "--num-prompts",
            str(size["heldout"]),
            "--sampled",
            str(size["sampled"]),
            "--seed",
            str(seed),
            "--output",
            str(out),
        ]
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


def one_run(kind: str, seed: int, variant, size: dict, context: dict, models: dict | None = None):
    """One job: ``offline`` (``variant``: the DPO negatives rule), ``rl`` (``variant``: the arm) or ``eval``
    (``variant``: the part, ``models``: its models); ``context``: the task, the mode and the long/short pair."""
    import torch

    torch.set_num_threads(1)
    task, mode, pair = context["task"], context["mode"], context["pair"]
    if kind == "offline":
        return offline(seed, size, variant, task, mode, pair)
    if kind == "rl":
        return rl(seed, variant, size, task, mode, pair)
    return evaluate(seed, variant, models, size, task, mode, pair)


def _mean(xs):
    return statistics.mean(xs)


def _se(xs):
    return statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0


def summarize(evals: dict[int, list[dict]]) -> dict:
    """Means over seeds of each model's accuracy and tokens, and of each method's paired accuracy delta (a fraction:
    0.095 is 9.5 points) and tokens ratio against the long model, with standard errors; greedy and sampled."""
    seeds = sorted(evals)
    by = {s: {r["name"]: r for r in evals[s]} for s in seeds}
    out: dict = {"long": {}, "short": {}, "methods": {}}
    for metric in ("greedy", "sampled"):
        for ref in ("long", "short"):
            out[ref][metric] = {
                "accuracy": _mean([by[s][ref][f"{metric}_accuracy"] for s in seeds]),
                "tokens": _mean([by[s][ref][f"{metric}_tokens"] for s in seeds]),
            }
        for name in METHODS:
            deltas = [by[s][name][f"{metric}_accuracy"] - by[s]["long"][f"{metric}_accuracy"] for s in seeds]
            ratios = [by[s][name][f"{metric}_tokens"] / by[s]["long"][f"{metric}_tokens"] for s in seeds]
            entry = out["methods"].setdefault(name, {"control": name in CONTROLS, "paper": name in PAPER})
            entry[metric] = {
                "accuracy": _mean([by[s][name][f"{metric}_accuracy"] for s in seeds]),
                "tokens": _mean([by[s][name][f"{metric}_tokens"] for s in seeds]),
                "accuracy_delta": _mean(deltas),
                "accuracy_delta_se": _se(deltas),
                "tokens_ratio": _mean(ratios),
                "tokens_ratio_se": _se(ratios),
                "per_seed_delta": [round(x, 4) for x in deltas],
            }
    return out


def write_report(summary: dict, size: dict, seeds: int, title: str, long: str, path_md: Path, path_png: Path) -> None:
    """The markdown tables (sampled, greedy; deltas in points) and the Fig. 7-style plot."""
    from k15_plugin.long2short.sampling import plot_efficiency

    lines = [
        f"# long2short on {title} ({seeds} seed{'s' if seeds > 1 else ''})",
        "",
        f"Long model `{long}`; {size['heldout']} held-out prompts; accuracy delta in points and tokens ratio "
        "against the long model, mean +- standard error over seeds (paired). DPO pairs: the paper's negatives "
        "(longer wrong answers, correct ones at least 1.5x longer).",
        "",
    ]
    tables, all_errors = {}, {}
    for metric in ("sampled", "greedy"):
        lines += [
            f"## {metric}" + (f" ({size['sampled']} samples per prompt, temperature 1)" if metric == "sampled" else ""),
            "",
            "| model | accuracy | mean tokens | accuracy delta (points) | tokens ratio | per-seed delta |",
            "|---|---|---|---|---|---|",
        ]
        long_m, short = summary["long"][metric], summary["short"][metric]
        lines.append(f"| long | {long_m['accuracy']:.3f} | {long_m['tokens']:.2f} | | 1.00 | |")
        table = [
            {"name": "long", "accuracy": long_m["accuracy"], "tokens": long_m["tokens"]},
            {"name": "short", "accuracy": short["accuracy"], "tokens": short["tokens"]},
        ]
        lines.append(
            f"| short (reference) | {short['accuracy']:.3f} | {short['tokens']:.2f} | "
            f"{100 * (short['accuracy'] - long_m['accuracy']):+.1f} | {short['tokens'] / long_m['tokens']:.2f} | |"
        )
        errors = {}
        for name, m in summary["methods"].items():
            e = m[metric]
            lines.append(
                f"| {LABELS.get(name, name)} | {e['accuracy']:.3f} | {e['tokens']:.2f} | "
                f"{100 * e['accuracy_delta']:+.1f} +- {100 * e['accuracy_delta_se']:.1f} | "
                f"{e['tokens_ratio']:.2f} +- {e['tokens_ratio_se']:.2f} | "
                f"{', '.join(f'{100 * d:+.1f}' for d in e['per_seed_delta'])} |"
            )
            table.append({"name": name, "accuracy": e["accuracy"], "tokens": e["tokens"]})
            errors[name] = e["accuracy_delta_se"]
        tables[metric], all_errors[metric] = table, errors
        lines.append("")
    path_md.write_text("\n".join(lines))
    plot_efficiency(tables, "long", path_png, errors=all_errors)


def main() -> None:
    """Command line of the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASKS), default="demo_sum3", help="the demo task (default demo_sum3)")
    mode_group = parser.add_mutually_exclusive_group()
    mode_group.add_argument("--smoke", action="store_true", help="1 seed, a few prompts and steps: seconds")
    mode_group.add_argument("--quick", action="store_true", help="1 seed, fewer prompts, steps and held-out prompts")
    parser.add_argument(
        "--workers", type=int, default=None, help="jobs at a time (0: in this process; default 2, 0 with --smoke)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the mode's)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(*json.loads(args.one))))
        return
    spec = TASKS[args.task]
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    size = dict(spec.sizes[mode])
    n_seeds = args.seeds or size["seeds"]
    size.pop("seeds")
    size["smoke"] = args.smoke
    start = time.time()
    if args.smoke:
        global WORK
        import tempfile

        WORK = Path(tempfile.mkdtemp(prefix="k15_l2s_smoke_"))
    os.environ["K15_BENCH_WORK"] = str(WORK)  # for the worker processes
    stem = spec.stem + ("_quick" if args.quick else "")
    cache = None if args.smoke else RESULTS / f"{stem}_runs.jsonl"
    pair = build_models(args.task, mode, size)
    context = {"task": args.task, "mode": mode, "pair": {"long": pair["long"], "short": pair["short"]}}
    if "built" in pair:  # a rebuilt pair (another recipe, at the same paths) must not reuse the cached jobs
        from k15_plugin.long2short.outputs import model_digest

        context["weights"] = {name: model_digest(Path(pair[name]))[:16] for name in ("long", "short")}
    seeds = list(range(n_seeds))
    # the longest jobs first (sampling and fine-tuning), so that the shorter RL runs fill the other worker
    jobs = [["offline", s, DPO_RULE, size, context] for s in seeds]
    jobs += [["rl", s, arm, size, context] for s in seeds for arm in ("long2short RL", "RL no penalty")]
    workers = args.workers if args.workers is not None else (0 if args.smoke else 2)
    results = run_jobs("bench.long2short", one_run, jobs, workers, cache)
    models = {s: {} for s in seeds}
    for job, result in zip(jobs, results, strict=True):
        models[job[1]].update(result["models"])
    stats = {job[1]: r["stats"] for job, r in zip(jobs, results, strict=True) if job[0] == "offline"}
    half = (len(METHODS) - 2) // 2  # part 0 also holds the long and the short model
    parts = [METHODS[:half], METHODS[half:]]
    eval_jobs = [
        ["eval", s, i, size, context, {m: models[s][m] for m in part}] for s in seeds for i, part in enumerate(parts)
    ]
    evals: dict[int, list[dict]] = {s: [] for s in seeds}
    for job, rows in zip(eval_jobs, run_jobs("bench.long2short", one_run, eval_jobs, workers, cache), strict=True):
        evals[job[1]] += rows
    summary = summarize(evals)
    eligible = {
        n: m[PRIMARY]
        for n, m in summary["methods"].items()
        if not m["control"] and m[PRIMARY]["accuracy_delta"] >= -ACCURACY_SLACK
    }
    best = min(eligible, key=lambda n: eligible[n]["tokens"]) if eligible else None
    long_name = spec.long or "tiny_demo_chain fine-tuned towards restated answers (make_chain_long2short_checkpoints)"
    if not args.smoke:
        write_report(summary, size, n_seeds, spec.title, long_name, RESULTS / f"{stem}.md", RESULTS / f"{stem}.png")
    methods = {
        n: {
            "accuracy_delta": round(m[PRIMARY]["accuracy_delta"], 4),
            "accuracy_delta_se": round(m[PRIMARY]["accuracy_delta_se"], 4),
            "tokens_ratio": round(m[PRIMARY]["tokens_ratio"], 3),
            "accuracy": round(m[PRIMARY]["accuracy"], 4),
            "tokens": round(m[PRIMARY]["tokens"], 3),
            "greedy_accuracy_delta": round(m["greedy"]["accuracy_delta"], 4),
            "greedy_tokens_ratio": round(m["greedy"]["tokens_ratio"], 3),
            "control": m["control"],
            "paper": m["paper"],
        }
        for n, m in summary["methods"].items()
    }
    write_json_line(
        {
            "bench": "long2short",
            "task": args.task,
            "quick": args.quick,
            "long": {
                "model": long_name,
                "accuracy": round(summary["long"][PRIMARY]["accuracy"], 4),
                "tokens": round(summary["long"][PRIMARY]["tokens"], 3),
                "greedy_accuracy": round(summary["long"]["greedy"]["accuracy"], 4),
                "greedy_tokens": round(summary["long"]["greedy"]["tokens"], 3),
            },
            "short": {
                "accuracy": round(summary["short"][PRIMARY]["accuracy"], 4),
                "tokens": round(summary["short"][PRIMARY]["tokens"], 3),
            },
            "methods": methods,
            "best": best,
            "best_tokens_ratio": None if best is None else methods[best]["tokens_ratio"],
            "best_accuracy_delta": None if best is None else methods[best]["accuracy_delta"],
            "target": {"tokens_ratio_max": spec.tokens_ratio_target, "accuracy_delta_min": -ACCURACY_SLACK},
            "met": best is not None and methods[best]["tokens_ratio"] <= spec.tokens_ratio_target,
            "accuracy_delta_unit": "fraction (0.095 = 9.5 points)",
            "metric": f"{PRIMARY}: pass@1 over {size['sampled']} samples per held-out prompt at temperature 1, "
            "mean answer tokens with EOS (greedy alongside)",
            "dpo": {"rule": DPO_RULE, "losses": DPO_LOSSES},
            "limits": {"long": spec.long_limit, "long2short_rl": spec.rl_limit},
            "seeds": n_seeds,
            "models_built": pair.get("built"),
            "sampling": stats,
            "settings": {k: v for k, v in size.items() if k != "smoke"},
            "seconds": round(time.time() - start, 1),
        },
        save=not args.smoke,
        machine_info=machine(),
        name=stem,
    )


if __name__ == "__main__":
    main()
