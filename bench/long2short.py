"""long2short (paper section 2.4, Fig. 7) on the three-term demo task: every method from the same long model.

    python -m bench.long2short            # 3 seeds, 2 jobs at a time: ~20 min on 2 cores
    python -m bench.long2short --smoke    # seconds; what the test suite runs

The long model is the shipped ``tiny_demo_sum3_long`` (``k15_plugin.data.sum3``): greedy decoding restates the problem
and writes the partial sum before the answer, ~19 tokens; answering directly is far less accurate. Per seed (paired:
every method of a seed starts from the same samples and data order), through the ``k15-long2short`` commands and
``k15-train``:

* **merge**: the long model averaged 0.5/0.5 with the shipped short model (the long model fine-tuned on direct
  answers), by mergekit; **merge 0.75**: weight 0.75 on the long model;
* **merge + RS**: shortest rejection sampling applied to the merged model (the paper's "merge + rs");
* **shortest RS**: 8 samples per training prompt from the long model, the shortest correct one per prompt, SFT of the
  long model on those (TRL SFTTrainer); control **RS random**: a random correct sample instead of the shortest;
* **DPO**: shortest correct against a wrong or >= 1.5x longer sample, DPO plus an SFT term on the chosen answer
  (TRL DPOTrainer); also **DPO plain** (the sigmoid loss alone, the paper's wording);
* **long2short RL**: ``k15-train experiment=long2short_rl`` (k1.5 with the length penalty, completions cut at 11
  tokens, 400 optimizer steps); control **RL no penalty**: the same run without the penalty and with the long model's
  20-token limit.

Held-out evaluation (500 prompts): sampled accuracy (pass@1 over 8 samples per prompt at temperature 1, the paper's
Fig. 7 measure) and mean answer tokens (EOS included), and the same for greedy decoding. "best" is the method with the
fewest sampled tokens among those within 2 points of the long model's sampled accuracy (means over paired seeds).
Results: results/long2short.json, .md, .png; finished jobs cached in
results/long2short_runs.jsonl (an interrupted run resumes). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS, machine, run_jobs, write_json_line

LONG, SHORT = "tiny_demo_sum3_long", "tiny_demo_sum3_short"
WORK = Path(os.environ.get("K15_BENCH_WORK", "/tmp/k15_bench_long2short"))
METHODS = [
    "merge",
    "merge 0.75",
    "merge + RS",
    "shortest RS",
    "RS random",
    "DPO",
    "DPO plain",
    "long2short RL",
    "RL no penalty",
]
CONTROLS = {"RS random", "DPO plain", "RL no penalty"}
# The paper's Fig. 7 measure: Pass@1 averaged over sampled runs, against mean tokens. Greedy is reported alongside.
PRIMARY = "sampled"
FULL = {"prompts": 4000, "merge_prompts": 2000, "rl_steps": 400, "heldout": 500, "sampled": 8, "seeds": 3}
SMOKE = {"prompts": 16, "merge_prompts": 8, "rl_steps": 2, "heldout": 16, "sampled": 1, "seeds": 1}


def _l2s(args: list[str]) -> dict:
    from k15_plugin.long2short.cli import run

    return run([*args, *(["--quiet"] if args[0] in ("sample", "eval", "sft", "dpo") else [])])


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


def offline(seed: int, size: dict) -> dict:
    """One seed's sampling-based methods; returns {method: model dir} and the sampling statistics."""
    d = WORK / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    out: dict = {"models": {}, "stats": {}}
    merged = str(d / "merge")
    _l2s(["merge", "--long", LONG, "--short", SHORT, "--output", merged])
    out["models"]["merge"] = merged
    _l2s(["merge", "--long", LONG, "--short", SHORT, "--output", str(d / "merge_075"), "--weight-long", "0.75"])
    out["models"]["merge 0.75"] = str(d / "merge_075")
    samples = d / "samples.jsonl"
    sampled = _l2s(
        [
            "sample",
            "--model",
            LONG,
            "--task",
            "demo_sum3",
            "--num-prompts",
            str(size["prompts"]),
            "--seed",
            str(seed),
            "--output",
            str(samples),
        ]
    )
    out["stats"]["samples"] = {k: sampled[k] for k in ("accuracy", "mean_tokens", "prompts_with_correct")}
    out["models"]["shortest RS"] = _sft("rs", LONG, samples, d, "shortest", seed)
    out["models"]["RS random"] = _sft("rs_random", LONG, samples, d, "random", seed)
    pairs = d / "pairs.jsonl"
    out["stats"]["pairs"] = _l2s(["build-dpo", "--samples", str(samples), "--output", str(pairs), "--seed", str(seed)])
    for name, loss in (("DPO", "sigmoid,sft"), ("DPO plain", "sigmoid")):
        target = d / name.lower().replace(" ", "_")
        _l2s(
            ["dpo", "--model", LONG, "--data", str(pairs), "--output", str(target), "--loss", loss, "--seed", str(seed)]
        )
        out["models"][name] = str(target)
    merge_samples = d / "merge_samples.jsonl"
    _l2s(
        [
            "sample",
            "--model",
            merged,
            "--task",
            "demo_sum3",
            "--num-prompts",
            str(size["merge_prompts"]),
            "--seed",
            str(seed),
            "--output",
            str(merge_samples),
        ]
    )
    out["models"]["merge + RS"] = _sft("merge_rs", merged, merge_samples, d, "shortest", seed)
    return out


def rl(seed: int, arm: str, size: dict) -> dict:
    """A second RL phase from the long model through k15-train; returns {method: final model dir}."""
    run_dir = WORK / f"seed{seed}" / ("rl" if arm == "long2short RL" else "rl_no_penalty")
    overrides = [
        f"seed={seed}",
        f"trainer.max_steps={size['rl_steps']}",
        "trainer.eval_steps=100000",
        "trainer.report_to=[]",
        f"hydra.run.dir={run_dir}",
        "trainer.eval_size=16",
    ]
    if arm == "RL no penalty":
        overrides += ["reward=correctness", "trainer.max_completion_length=20"]  # the long model's own limit
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


def evaluate(seed: int, models: dict, size: dict) -> list[dict]:
    out = WORK / f"seed{seed}" / "eval.jsonl"
    pairs = [f"long={LONG}", f"short={SHORT}", *(f"{name}={path}" for name, path in models.items())]
    _l2s(
        [
            "eval",
            "--models",
            *pairs,
            "--task",
            "demo_sum3",
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


def one_run(kind: str, seed: int, arm: str | None, size: dict, models: dict | None = None):
    import torch

    torch.set_num_threads(1)
    if kind == "offline":
        return offline(seed, size)
    if kind == "rl":
        return rl(seed, arm, size)
    return evaluate(seed, models, size)


def _mean(xs):
    return statistics.mean(xs)


def _se(xs):
    return statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0


def summarize(evals: dict[int, list[dict]]) -> dict:
    seeds = sorted(evals)
    by = {s: {r["name"]: r for r in evals[s]} for s in seeds}
    out: dict = {"long": {}, "short": {}, "methods": {}}
    for metric in ("greedy", "sampled"):
        long_acc = [by[s]["long"][f"{metric}_accuracy"] for s in seeds]
        long_tok = [by[s]["long"][f"{metric}_tokens"] for s in seeds]
        out["long"][metric] = {"accuracy": _mean(long_acc), "tokens": _mean(long_tok)}
        out["short"][metric] = {
            "accuracy": _mean([by[s]["short"][f"{metric}_accuracy"] for s in seeds]),
            "tokens": _mean([by[s]["short"][f"{metric}_tokens"] for s in seeds]),
        }
        for name in METHODS:
            deltas = [100 * (by[s][name][f"{metric}_accuracy"] - by[s]["long"][f"{metric}_accuracy"]) for s in seeds]
            ratios = [by[s][name][f"{metric}_tokens"] / by[s]["long"][f"{metric}_tokens"] for s in seeds]
            entry = out["methods"].setdefault(name, {"control": name in CONTROLS})
            entry[metric] = {
                "accuracy": _mean([by[s][name][f"{metric}_accuracy"] for s in seeds]),
                "tokens": _mean([by[s][name][f"{metric}_tokens"] for s in seeds]),
                "accuracy_delta": _mean(deltas),
                "accuracy_delta_se": _se(deltas),
                "tokens_ratio": _mean(ratios),
                "tokens_ratio_se": _se(ratios),
                "per_seed_delta": [round(d, 2) for d in deltas],
            }
    return out


def write_report(summary: dict, size: dict, seeds: int, path_md: Path, path_png: Path) -> None:
    from k15_plugin.long2short.sampling import plot_efficiency

    lines = [
        f"# long2short on the three-term demo task ({seeds} seeds)",
        "",
        f"Long model `{LONG}`; {size['heldout']} held-out prompts; accuracy delta in points and tokens ratio "
        "against the long model, mean +- standard error over seeds (paired).",
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
        long, short = summary["long"][metric], summary["short"][metric]
        lines.append(f"| long | {long['accuracy']:.3f} | {long['tokens']:.2f} | | 1.00 | |")
        table = [
            {"name": "long", "accuracy": long["accuracy"], "tokens": long["tokens"]},
            {"name": "short", "accuracy": short["accuracy"], "tokens": short["tokens"]},
        ]
        lines.append(
            f"| short (reference) | {short['accuracy']:.3f} | {short['tokens']:.2f} | "
            f"{100 * (short['accuracy'] - long['accuracy']):+.1f} | {short['tokens'] / long['tokens']:.2f} | |"
        )
        errors = {}
        for name, m in summary["methods"].items():
            e = m[metric]
            label = f"{name} (control)" if m["control"] else name
            lines.append(
                f"| {label} | {e['accuracy']:.3f} | {e['tokens']:.2f} | {e['accuracy_delta']:+.1f} +- "
                f"{e['accuracy_delta_se']:.1f} | {e['tokens_ratio']:.2f} +- {e['tokens_ratio_se']:.2f} | "
                f"{', '.join(f'{d:+.1f}' for d in e['per_seed_delta'])} |"
            )
            table.append({"name": name, "accuracy": e["accuracy"], "tokens": e["tokens"]})
            errors[name] = e["accuracy_delta_se"] / 100
        tables[metric], all_errors[metric] = table, errors
        lines.append("")
    path_md.write_text("\n".join(lines))
    plot_efficiency(tables, "long", path_png, errors=all_errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1 seed, a few prompts and steps: seconds")
    parser.add_argument(
        "--workers", type=int, default=None, help="jobs at a time (0: in this process; default 2, 0 with --smoke)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; 1 with --smoke)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(*json.loads(args.one))))
        return
    size = dict(SMOKE if args.smoke else FULL)
    n_seeds = args.seeds or size.pop("seeds")
    size.pop("seeds", None)
    size["smoke"] = args.smoke
    start = time.time()
    if args.smoke:
        global WORK
        import tempfile

        WORK = Path(tempfile.mkdtemp(prefix="k15_l2s_smoke_"))
    os.environ["K15_BENCH_WORK"] = str(WORK)  # for the worker processes
    cache = None if args.smoke else RESULTS / "long2short_runs.jsonl"
    seeds = list(range(n_seeds))
    jobs = [["rl", s, arm, size] for s in seeds for arm in ("long2short RL", "RL no penalty")]
    jobs += [["offline", s, None, size] for s in seeds]
    workers = args.workers if args.workers is not None else (0 if args.smoke else 2)
    results = run_jobs("bench.long2short", one_run, jobs, workers, cache)
    models = {s: {} for s in seeds}
    for job, result in zip(jobs, results, strict=True):
        models[job[1]].update(result["models"])
    stats = {s: r["stats"] for job, r in zip(jobs, results, strict=True) if job[0] == "offline" for s in [job[1]]}
    eval_jobs = [["eval", s, None, size, {m: models[s][m] for m in METHODS}] for s in seeds]
    evals = dict(zip(seeds, run_jobs("bench.long2short", one_run, eval_jobs, workers, cache), strict=True))
    summary = summarize(evals)
    eligible = {
        n: m[PRIMARY]
        for n, m in summary["methods"].items()
        if not m["control"] and m[PRIMARY]["accuracy_delta"] >= -2.0
    }
    best = min(eligible, key=lambda n: eligible[n]["tokens"]) if eligible else None
    if not args.smoke:
        write_report(summary, size, n_seeds, RESULTS / "long2short.md", RESULTS / "long2short.png")
    methods = {
        n: {
            "accuracy_delta": round(m[PRIMARY]["accuracy_delta"], 2),
            "accuracy_delta_se": round(m[PRIMARY]["accuracy_delta_se"], 2),
            "tokens_ratio": round(m[PRIMARY]["tokens_ratio"], 3),
            "accuracy": round(m[PRIMARY]["accuracy"], 4),
            "tokens": round(m[PRIMARY]["tokens"], 3),
            "greedy_accuracy_delta": round(m["greedy"]["accuracy_delta"], 2),
            "greedy_tokens_ratio": round(m["greedy"]["tokens_ratio"], 3),
            "control": m["control"],
        }
        for n, m in summary["methods"].items()
    }
    write_json_line(
        {
            "bench": "long2short",
            "long": {
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
            "target": {"tokens_ratio_max": 0.55, "accuracy_delta_min": -2.0},
            "met": best is not None and methods[best]["tokens_ratio"] <= 0.55,
            "metric": f"{PRIMARY}: pass@1 over {size['sampled']} samples per held-out prompt at temperature 1, "
            "mean answer tokens with EOS (greedy alongside)",
            "seeds": n_seeds,
            "sampling": stats,
            "settings": {k: v for k, v in size.items() if k != "smoke"},
            "seconds": round(time.time() - start, 1),
        },
        save=not args.smoke,
        machine_info=machine(),
    )


if __name__ == "__main__":
    main()
