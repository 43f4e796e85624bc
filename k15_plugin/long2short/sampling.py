"""Sampling and evaluation for long2short: n scored samples per prompt (the input of shortest rejection sampling and
of the DPO pairs), and accuracy against mean answer tokens for a set of models (the paper's Fig. 7).

Generation is :class:`k15_plugin.jobs.Generator` (vLLM when importable and a GPU is present, else batched
``transformers.generate``); a completion's length is its generated token ids, EOS included, the count TRL's
``completion_ids`` and the length penalty use. Progress is kept in an fsync'd sidecar (``<output>.partial.jsonl``),
so a rerun of an interrupted command resumes where it stopped; the output is written in one piece at the end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from k15_plugin.long2short.data import Long2ShortError, Prompts, make_scorer, model_dir
from k15_plugin.long2short.outputs import model_digest

CORRECT = 1.0  # a sample counts as correct when its reward reaches this (the plugin's rewards give 1.0 for right)


def _generator(
    model: Path, backend: str, temperature: float, max_new_tokens: int, batch_size: int, chat: bool, seed: int
):
    from k15_plugin.jobs import Generator

    return Generator(str(model), backend, temperature, max_new_tokens, batch_size, chat, seed)


def _scored(generator, score, rows: list[dict], n: int, seed: int) -> list[list[dict]]:
    """``n`` samples for each row: ``{"text", "tokens", "reward", "correct", "truncated"}``."""
    eos = generator.tokenizer.eos_token_id
    groups = generator.sample([r["prompt"] for r in rows], n, seed)
    out = []
    for row, group in zip(rows, groups, strict=True):
        texts, ids = [t for t, _ in group], [list(i) for _, i in group]
        rewards = score(texts, ids, [row] * len(group))
        out.append(
            [
                {
                    "text": t,
                    "tokens": len(i),
                    "reward": float(r),
                    "correct": bool(r >= CORRECT),
                    "truncated": not i or i[-1] != eos,
                }
                for t, i, r in zip(texts, ids, rewards, strict=True)
            ]
        )
    return out


def _check_sampling(n: int, temperature: float, max_new_tokens: int | None, batch_size: int) -> None:
    if n < 1 or batch_size < 1:
        raise Long2ShortError("--n / --sampled and --batch-size must be >= 1")
    if not temperature > 0:
        raise Long2ShortError(f"--temperature must be > 0, got {temperature}")
    if max_new_tokens is None:
        raise Long2ShortError("--max-new-tokens is required with --input (the built-in tasks know their own)")
    if max_new_tokens < 1:
        raise Long2ShortError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")


def sample(
    model: str,
    prompts: Prompts,
    output: str,
    *,
    n: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    reward: str = "task",
    extraction: str | None = None,
    backend: str = "auto",
    batch_size: int = 256,
    chat: bool = False,
    seed: int = 0,
    restart: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``n`` scored samples per prompt into ``output`` (JSONL: the prompt's row plus ``samples``)."""
    from k15_plugin.jobs import Sidecar, run_chunks, write_atomically

    max_new_tokens = prompts.max_new_tokens if max_new_tokens is None else max_new_tokens
    _check_sampling(n, temperature, max_new_tokens, batch_size)
    path = model_dir(model, "--model")
    job = {
        "command": "sample",
        "model": str(path.resolve()),
        "model_sha256": model_digest(path),
        "prompts": prompts.source,
        "num_prompts": len(prompts.rows),
        "n": n,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "reward": reward,
        "extraction": extraction,
        "chat": chat,
        "seed": seed,
        "batch_size": batch_size,
    }
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    sidecar = Sidecar(out, job, restart=restart, error=Long2ShortError)
    resumed = len(sidecar.done)
    rows = prompts.rows
    try:
        generator = _generator(path, backend, temperature, max_new_tokens, batch_size, chat, seed)
        score = make_scorer(prompts, generator.tokenizer, reward, extraction)

        def work(indices: list[int]) -> dict[int, dict]:
            groups = _scored(generator, score, [rows[i] for i in indices], n, seed + indices[0])
            return {i: {"samples": g} for i, g in zip(indices, groups, strict=True)}

        chunk = max(1, batch_size // n)
        complete = run_chunks(sidecar, len(rows), work, chunk, stop_after, "sample", "prompt", progress)
    finally:
        sidecar.close()
    summary: dict[str, Any] = {"command": "sample", "complete": complete, "resumed": resumed}
    if not complete:
        return summary
    written = [{**row, "samples": sidecar.done[i]["samples"]} for i, row in enumerate(rows)]
    write_atomically(out, written)
    sidecar.remove()
    samples = [s for r in written for s in r["samples"]]
    return {
        **summary,
        "output": str(out),
        "prompts": len(written),
        "samples": len(samples),
        "accuracy": sum(s["correct"] for s in samples) / len(samples),
        "mean_tokens": sum(s["tokens"] for s in samples) / len(samples),
        "truncated": sum(s["truncated"] for s in samples) / len(samples),
        "prompts_with_correct": sum(any(s["correct"] for s in r["samples"]) for r in written),
    }


def parse_models(pairs: list[str]) -> dict[str, str]:
    """``name=PATH`` pairs (``PATH`` alone is named by its directory)."""
    models: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep:
            name, path = Path(pair).name or pair, pair
        if not name or not path:
            raise Long2ShortError(f"--models {pair}: expected name=PATH")
        if name in models:
            raise Long2ShortError(f"--models: the name {name!r} is given twice")
        models[name] = path
    if not models:
        raise Long2ShortError("--models: give at least one name=PATH")
    return models


def evaluate(
    models: dict[str, str],
    prompts: Prompts,
    output: str,
    *,
    sampled: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    reward: str = "task",
    extraction: str | None = None,
    backend: str = "auto",
    batch_size: int = 256,
    chat: bool = False,
    seed: int = 0,
    restart: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy and sampled accuracy and mean tokens of every model on the same prompts, one JSONL row per model.

    Greedy: one completion per prompt. Sampled (the paper's Pass@1, "averaged over 8 runs"): ``sampled``
    completions per prompt at ``temperature``, averaged (0 skips it). Also the standard error of each accuracy over
    prompts and the share of truncated completions.
    """
    from k15_plugin.jobs import Sidecar, run_chunks, write_atomically

    max_new_tokens = prompts.max_new_tokens if max_new_tokens is None else max_new_tokens
    _check_sampling(max(sampled, 1), temperature, max_new_tokens, batch_size)
    dirs = {name: model_dir(path, f"--models {name}=") for name, path in models.items()}
    job = {
        "command": "eval",
        "models": {k: str(p.resolve()) for k, p in dirs.items()},
        "models_sha256": {k: model_digest(p) for k, p in dirs.items()},
        "prompts": prompts.source,
        "num_prompts": len(prompts.rows),
        "sampled": sampled,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "reward": reward,
        "extraction": extraction,
        "chat": chat,
        "seed": seed,
    }
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    sidecar = Sidecar(out, job, restart=restart, error=Long2ShortError)
    names = list(dirs)
    rows = prompts.rows

    def measure(generator, score, n: int) -> dict[str, float]:
        per_prompt, tokens, truncated = [], 0, 0
        for start in range(0, len(rows), max(1, batch_size // n)):
            part = rows[start : start + max(1, batch_size // n)]
            for group in _scored(generator, score, part, n, seed + start):
                per_prompt.append(sum(s["correct"] for s in group) / n)
                tokens += sum(s["tokens"] for s in group)
                truncated += sum(s["truncated"] for s in group)
        m = len(per_prompt)
        acc = sum(per_prompt) / m
        se = math.sqrt(sum((x - acc) ** 2 for x in per_prompt) / max(m - 1, 1) / m)
        return {"accuracy": acc, "accuracy_se": se, "tokens": tokens / (m * n), "truncated": truncated / (m * n)}

    def work(indices: list[int]) -> dict[int, dict]:
        (i,) = indices
        generator = _generator(dirs[names[i]], backend, 0.0, max_new_tokens, batch_size, chat, seed)
        score = make_scorer(prompts, generator.tokenizer, reward, extraction)
        record = {f"greedy_{k}": v for k, v in measure(generator, score, 1).items()}
        if sampled:
            generator.temperature = temperature
            record.update({f"sampled_{k}": v for k, v in measure(generator, score, sampled).items()})
        return {i: record}

    try:
        run_chunks(sidecar, len(names), work, 1, None, "eval", "model", progress)
    finally:
        sidecar.close()
    written = [
        {"name": name, "path": str(dirs[name]), "prompts": len(rows), "sampled_k": sampled, **sidecar.done[i]}
        for i, name in enumerate(names)
    ]
    write_atomically(out, written)
    sidecar.remove()
    return {"command": "eval", "complete": True, "output": str(out), "models": written}


def read_eval(path: str) -> list[dict]:
    """The rows of an ``eval`` output file, one per model; :class:`Long2ShortError` when a row lacks ``name``,
    ``greedy_accuracy`` or ``greedy_tokens``."""
    from k15_plugin.long2short.data import read_jsonl, require_columns

    rows = read_jsonl(path, "--eval")
    require_columns(rows, path, ("name", "greedy_accuracy", "greedy_tokens"))
    return rows


def efficiency_table(rows: list[dict], reference: str, metric: str = "greedy") -> list[dict]:
    """Per model: accuracy, tokens, accuracy delta in points and tokens ratio against ``reference``."""
    by_name = {r["name"]: r for r in rows}
    if reference not in by_name:
        raise Long2ShortError(f"--reference {reference}: no such model in the evaluation ({sorted(by_name)})")
    ref = by_name[reference]
    if f"{metric}_accuracy" not in ref:
        raise Long2ShortError(f"the evaluation has no {metric} metrics (run eval with --sampled K)")
    return [
        {
            "name": r["name"],
            "accuracy": r[f"{metric}_accuracy"],
            "tokens": r[f"{metric}_tokens"],
            "accuracy_delta": 100 * (r[f"{metric}_accuracy"] - ref[f"{metric}_accuracy"]),
            "tokens_ratio": r[f"{metric}_tokens"] / ref[f"{metric}_tokens"],
        }
        for r in rows
    ]


def report(eval_path: str, reference: str, output: str, plot: str | None = None) -> dict[str, Any]:
    """A markdown table (greedy and, where measured, sampled) and a Fig. 7-style plot: accuracy against mean
    tokens, one point per model."""
    rows = read_eval(eval_path)
    metrics = ["greedy"] + (["sampled"] if all("sampled_accuracy" in r for r in rows) else [])
    lines = [f"Models evaluated on {rows[0].get('prompts', '?')} prompts; deltas against `{reference}`.", ""]
    tables = {}
    for metric in metrics:
        table = efficiency_table(rows, reference, metric)
        tables[metric] = table
        lines += [
            f"**{metric}**" + (f" ({rows[0].get('sampled_k')} samples per prompt)" if metric == "sampled" else ""),
            "",
            "| model | accuracy | mean tokens | accuracy delta (points) | tokens ratio |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {t['name']} | {t['accuracy']:.3f} | {t['tokens']:.2f} | {t['accuracy_delta']:+.1f} | "
            f"{t['tokens_ratio']:.2f} |"
            for t in table
        ]
        lines.append("")
    _write_text(Path(output), "\n".join(lines))
    if plot:
        plot_efficiency(tables, reference, Path(plot))
    return {"command": "report", "output": output, "plot": plot, "tables": tables}


def _write_text(path: Path, text: str) -> None:
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def plot_efficiency(tables: dict[str, list[dict]], reference: str, path: Path, errors: dict | None = None) -> None:
    """Accuracy against mean tokens, one point per model, one panel per metric (the paper's Fig. 7)."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.2), squeeze=False)
    for ax, (metric, table) in zip(axes[0], tables.items(), strict=True):
        for t in table:
            err = (errors or {}).get(metric, {}).get(t["name"])
            ax.errorbar(
                t["tokens"],
                100 * t["accuracy"],
                yerr=None if err is None else 100 * err,
                fmt="*" if t["name"] == reference else "o",
                ms=12 if t["name"] == reference else 7,
                capsize=3,
            )
            ax.annotate(
                t["name"], (t["tokens"], 100 * t["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=8
            )
        ax.set_xlabel("mean answer tokens (EOS included)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{metric} decoding")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
