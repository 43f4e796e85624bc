"""The verl GPU check: a few steps of k1.5 mirror descent on Qwen2.5-0.5B with verl's vLLM rollout, then a resume.

    python -m bench.verl_gpu_check                 # one GPU, verl 0.9 + vLLM installed, the model in the HF cache
    python -m bench.verl_gpu_check --compose-only  # any machine: writes the data, composes verl's config (--cfg job)

What it checks that the CPU tests cannot: the plugin's classes inside verl's Ray workers (the entry point registering
in every process), the k15_md loss on FSDP with vLLM's rollouts (``actor/k15_l2_term`` is 0 on a rollout batch's
first mini-batch and positive after), the optimizer reset as a remote call on the actor workers, the prioritized
sampler and length penalty in a real step, and a resume from the checkpoint verl writes (``data.pt`` with the
sampler's state). The data are synthetic sums asked GSM8K-style, scored by verl's own ``openai/gsm8k`` rule, so no
dataset download is needed. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_data(directory: Path, rows: int, seed: int) -> tuple[Path, Path]:
    import pandas as pd

    rng = random.Random(seed)

    def row(i: int) -> dict:
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 9)
        question = f"What is {a} + {b} * {c}? Think step by step, then give the answer after '####'."
        return {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": question}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(a + b * c)},
            "extra_info": {"index": i},
        }

    directory.mkdir(parents=True, exist_ok=True)
    train, val = directory / "train.parquet", directory / "val.parquet"
    pd.DataFrame([row(i) for i in range(rows)]).to_parquet(train)
    pd.DataFrame([row(rows + i) for i in range(32)]).to_parquet(val)
    return train, val


def verl_command(config_dir: str, model: str, train: Path, val: Path, workdir: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        f"--config-dir={config_dir}",
        "--config-name=k15_md",
        f"data.train_files={train}",
        f"data.val_files={val}",
        "data.train_batch_size=16",
        "data.max_prompt_length=256",
        "data.max_response_length=256",
        f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.actor.optim.lr=1e-6",
        # 2 optimizer steps per rollout batch of 16 prompts x 4 samples
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.4",
        "actor_rollout_ref.rollout.n=4",
        "algorithm.k15.tau=0.5",
        "algorithm.k15.sampler.name=prioritized",
        "algorithm.k15.length_penalty.weight=0.1",
        "algorithm.k15.length_penalty.warmup_steps=1",
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
        f"trainer.total_training_steps={steps}",
        "trainer.save_freq=2",
        "trainer.test_freq=-1",
        "trainer.val_before_train=false",
        "trainer.logger=[console,file]",
        f"trainer.default_local_dir={workdir / 'checkpoints'}",
        "trainer.project_name=k15_gpu_check",
        "trainer.experiment_name=k15_md",
    ]


def run(cmd: list[str], log: Path, env: dict) -> tuple[int, list[dict]]:
    env = {**env, "VERL_FILE_LOGGER_PATH": str(log)}
    out = subprocess.run(cmd, env=env, text=True, capture_output=True)
    sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
    steps = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return out.returncode, steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--compose-only", action="store_true", help="compose verl's config and stop (no GPU needed)")
    args = parser.parse_args(argv)

    from k15_plugin.verl import CONFIG_DIR

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="k15_verl_check_"))
    train, val = write_data(workdir / "data", 256, seed=0)
    cmd = verl_command(CONFIG_DIR, args.model, train, val, workdir, args.steps)
    env = dict(os.environ)
    if args.compose_only:
        out = subprocess.run([*cmd, "--cfg", "job"], env=env, text=True, capture_output=True)
        ok = out.returncode == 0 and "k15_md" in out.stdout
        sys.stderr.write(out.stderr[-2000:])
        print(json.dumps({"bench": "verl_gpu_check", "compose_only": True, "composed": ok}))
        return 0 if ok else 1

    start = time.time()
    code, first = run(cmd, workdir / "run.jsonl", env)
    # resume from global_step_2 (save_freq=2) and run the last step again from verl's checkpoint and data.pt
    resumed_code, resumed = run([*cmd, "trainer.resume_mode=auto"], workdir / "resumed.jsonl", env)
    data_pt = workdir / "checkpoints" / "global_step_2" / "data.pt"

    def series(steps: list[dict], key: str) -> list:
        return [s["data"].get(key) for s in steps]

    result = {
        "bench": "verl_gpu_check",
        "model": args.model,
        "returncode": code,
        "steps": len(first),
        "k15_l2_term": series(first, "actor/k15_l2_term"),
        "pg_loss": series(first, "actor/pg_loss"),
        "score_mean": series(first, "critic/score/mean"),
        "response_length_mean": series(first, "response_length/mean"),
        "optimizer_resets": series(first, "k15/optimizer_resets"),
        "length_penalty_weight": series(first, "k15/length_penalty_weight"),
        "sampler_updates": series(first, "k15/sampler_updates"),
        "data_pt_saved": data_pt.exists(),
        "resume_returncode": resumed_code,
        "resumed_steps": [s["step"] for s in resumed],
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(result))
    return 0 if code == 0 and resumed_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
