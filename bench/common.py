"""Shared set-up for the benchmarks: the demo task, and one place that builds each algorithm's trainer.

Every benchmark compares the plugin with TRL's own trainer in the same run, on the same model, data, generation
settings and seeds, and prints ratios; absolute times drift on shared machines.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# The demo recipe: 16 prompts x 8 samples, 4 new tokens, AdamW 1e-4 (beta2 0.99), clip 1.0.
DEMO = dict(
    per_device_train_batch_size=128,
    num_generations=8,
    max_completion_length=4,
    temperature=1.0,
    learning_rate=1e-4,
    adam_beta2=0.99,
    max_grad_norm=1.0,
    lr_scheduler_type="constant",
    use_cpu=True,
    bf16=False,
    report_to=[],
    save_strategy="no",
    disable_tqdm=True,
)


def run_jobs(module: str, one_run, jobs: list, workers: int, cache: Path | None = None) -> list[dict]:
    """``one_run(*job)`` for each job, in order: here one after another (``workers`` 0), or ``workers`` at a time, each
    in a fresh ``python -m <module> --one <job as JSON>`` process whose last stdout line is the result as JSON.

    ``cache``: a JSON-lines file of finished jobs (``{"job": ..., "result": ...}``, one line appended as each job
    ends); jobs already there are not run again, so an interrupted benchmark resumes where it stopped."""
    done = {}
    if cache is not None and cache.exists():
        text = cache.read_text()
        if text and not text.endswith("\n"):  # cut short: the next line starts on a line of its own
            with cache.open("a") as f:
                f.write("\n")
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interruption
                continue
            done[json.dumps(entry["job"])] = entry["result"]
    lock = threading.Lock()

    def finished(job, result):
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with lock, cache.open("a") as f:
                f.write(json.dumps({"job": job, "result": result}) + "\n")
        return result

    def run(job):
        key = json.dumps(job)
        if key in done:
            return done[key]
        if workers == 0:
            return finished(job, one_run(*job))
        out = subprocess.run([sys.executable, "-m", module, "--one", key], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{module} --one {key} failed:\n{out.stderr[-2000:]}")
        return finished(job, json.loads(out.stdout.strip().splitlines()[-1]))

    if workers == 0:
        return [run(job) for job in jobs]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, jobs))


def samples_to_target(run: dict, target: float) -> int | None:
    """Samples a run's held-out curve (points with ``samples`` and ``accuracy``) took to reach ``target``."""
    return next((p["samples"] for p in run["curve"] if p["accuracy"] >= target), None)


def machine() -> str:
    import torch  # here, not at the top: the sandbox benchmark needs no torch

    return f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def build_trainer(
    algorithm: str, model, tokenizer, train, reward_funcs, output_dir, callbacks=(), trainer_cls=None, **overrides
):
    """``algorithm``: ``kimi_md``, ``grpo`` (TRL's GRPOTrainer as-is), ``dr_grpo``, ``rloo`` (TRL's own trainers).

    k1.5 options (``tau``, ``log_z_estimator``, ``num_iterations``, ...) go in ``overrides``; ``trainer_cls``
    replaces the algorithm's trainer class with a subclass of it (same config).
    """
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from k15_plugin import KimiMirrorDescentConfig, KimiMirrorDescentTrainer

    args = {**DEMO, "output_dir": str(output_dir), **overrides}
    if algorithm == "kimi_md":
        config_cls, default_cls = KimiMirrorDescentConfig, KimiMirrorDescentTrainer
    elif algorithm in ("grpo", "dr_grpo"):
        config_cls, default_cls = GRPOConfig, GRPOTrainer
        if algorithm == "dr_grpo":
            args.update(loss_type="dr_grpo", scale_rewards="none")
    elif algorithm == "rloo":
        config_cls, default_cls = RLOOConfig, RLOOTrainer
        args.setdefault("beta", 0.0)
    else:
        raise ValueError(f"algorithm must be one of kimi_md, grpo, dr_grpo, rloo, got {algorithm!r}")
    from transformers.trainer_callback import PrinterCallback

    trainer = (trainer_cls or default_cls)(
        model=model,
        reward_funcs=reward_funcs,
        args=config_cls(**args),
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # no log dict printed at every logging step
    return trainer


def demo_task(seed: int = 0, filler: bool = False):
    from k15_plugin.data.arithmetic import (
        DEMO_CHECKPOINT_DIR,
        DEMO_FILLER_CHECKPOINT_DIR,
        ArithmeticReward,
        load_demo_checkpoint,
        make_datasets,
    )

    model, tokenizer = load_demo_checkpoint(DEMO_FILLER_CHECKPOINT_DIR if filler else DEMO_CHECKPOINT_DIR)
    train, heldout = make_datasets(seed=seed, filler_max=6 if filler else 0)
    return model, tokenizer, train, heldout, [ArithmeticReward(tokenizer, allow_filler=filler)]


def chain_task(seed: int = 0, heldout_size: int = 700, num_train: int = 10_000):
    """The chained-addition task (``data=demo_chain``) from the shipped ``tiny_demo_chain``: model, tokenizer, train
    (``num_train`` chains drawn with ``seed``, k in 2..8, a ``difficulty`` column = k), the fixed held-out set
    (``heldout_size`` chains, the same number per k) and the reward (worked answers accepted)."""
    from k15_plugin.data.arithmetic import DEMO_MODELS, ArithmeticReward, load_demo_checkpoint
    from k15_plugin.data.chain import make_chain_datasets

    model, tokenizer = load_demo_checkpoint(DEMO_MODELS["tiny_demo_chain"])
    train, heldout = make_chain_datasets(num_train=num_train, seed=seed, heldout_size=heldout_size)
    return model, tokenizer, train, heldout, [ArithmeticReward(tokenizer, allow_steps=True)]


def write_json_line(obj: dict, save: bool = True, machine_info: str | None = None, name: str | None = None) -> None:
    """The benchmark's last line: one JSON object (also saved as bench/results/<name>.json, ``name`` defaulting to
    the object's ``bench``, unless ``save`` is off)."""
    obj = {**obj, "date": time.strftime("%Y-%m-%d"), "machine": machine_info or machine()}
    if save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name or obj['bench']}.json").write_text(json.dumps(obj, indent=2) + "\n")
    print(json.dumps(obj), flush=True)
