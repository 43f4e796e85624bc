"""What a CLI run leaves in its run directory: metrics JSONL, held-out curve, plots, summary; and its progress
(a bar on a terminal, plain lines in a log: ``k15_plugin.cli.progress``).

Only the main process writes (under ``accelerate launch`` every process shares the run directory).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from transformers import TrainerCallback

from k15_plugin.cli.progress import progress_bar

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "curves.png"


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` all at once (a temporary file beside it, renamed over it): never a half-written
    file in the run directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_summary(run_dir: Path, summary: dict) -> None:
    """``<run dir>/summary.json``, written atomically."""
    write_text_atomically(Path(run_dir) / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


class RunFilesCallback(TrainerCallback):
    """Progress (bar or lines), one JSON line per logging step, and greedy held-out evaluation every ``eval_steps``.

    ``evaluate(limit)`` returns ``{"accuracy", "mean_completion_tokens"}`` on the first ``limit`` held-out prompts (all
    of them for ``None``). It is collective: every process calls it at the same points (each decodes a shard), so the
    evaluation also holds under DeepSpeed ZeRO-3. The accuracy before training is taken when training begins (the
    model is then on its device, and a resumed run's checkpoint is loaded); results are logged through the trainer
    (so TensorBoard gets them too) as ``heldout/accuracy`` and ``heldout/mean_completion_tokens``.
    """

    def __init__(self, run_dir: Path, evaluate, eval_steps: int, eval_size: int, is_main: bool):
        self.run_dir = Path(run_dir)
        self.evaluate = evaluate
        self.eval_steps = eval_steps
        self.eval_size = eval_size
        self.is_main = is_main
        self.trainer = None  # set after the trainer exists, to log evaluation results through it
        self.before: dict | None = None  # held-out metrics when training began
        self.bar = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        """Take the held-out figures before training (every process: the evaluation is collective); start the bar."""
        self.before = self.evaluate(None)
        if self.is_main:
            self.bar = progress_bar(state.max_steps, state.global_step, args.logging_steps)

    def on_step_end(self, args, state, control, **kwargs):
        """Advance the bar, then every ``eval_steps`` steps run the held-out evaluation and log it via the trainer."""
        if self.bar is not None:  # first: the evaluation's log below belongs to this step (and a line is due now)
            self.bar.update(state.global_step - self.bar.n)
        if self.eval_steps and state.global_step % self.eval_steps == 0 and state.global_step < state.max_steps:
            result = self.evaluate(self.eval_size)  # every process: the evaluation is collective
            if self.trainer is not None:
                self.trainer.log({f"heldout/{k}": v for k, v in result.items()})

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Append the numeric logs to ``metrics.jsonl`` (main process); show reward, accuracy and length on the bar."""
        if not self.is_main or not logs:
            return
        record = {"step": state.global_step, **{k: v for k, v in logs.items() if _is_number(v)}}
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            for key, short in (("reward", "reward"), ("heldout/accuracy", "acc"), ("completions/mean_length", "len")):
                if key in logs:
                    self.postfix[short] = f"{logs[key]:.3g}"
            self.bar.set_postfix(self.postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``<run dir>/metrics.jsonl``, one dict per logging step (empty when there is no file)."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_plots(run_dir: Path, before: dict, after: dict, max_steps: int) -> Path | None:
    """Reward, held-out accuracy and completion length against step, in one PNG. None, with one line on standard
    error, where matplotlib is not installed (the offline GPU check ships no matplotlib: bench/gpu_wheels.sh)."""
    try:
        import matplotlib
    except ImportError:
        print(f"k15-train: {PLOT_FILE} not written: matplotlib is not installed", file=sys.stderr)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)

    def series(key):
        points = [(r["step"], r[key]) for r in records if key in r]
        return [p[0] for p in points], [p[1] for p in points]

    acc_steps, acc = series("heldout/accuracy")
    acc_steps, acc = [0, *acc_steps, max_steps], [before["accuracy"], *acc, after["accuracy"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    panels = [
        (axes[0], series("reward"), "sampled reward"),
        (axes[1], (acc_steps, acc), "held-out accuracy (greedy)"),
        (axes[2], series("completions/mean_length"), "completion tokens (sampled)"),
    ]
    for ax, (x, y), title in panels:
        ax.plot(x, y, marker="o" if len(x) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(run_dir) / PLOT_FILE
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
