"""One training step of Qwen2.5-0.5B-Instruct on GSM8K with vLLM colocated generation: k1.5 vs TRL's GRPO.

GPU only (not run in CI): `bash bench/gpu_step.sh`. Needs `pip install -e ".[vllm]"` and Hub access for the model
and the dataset. Both trainers get identical settings and alternate runs; TRL's own `step_time` metric is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from k15_plugin import KimiMirrorDescentConfig, KimiMirrorDescentTrainer
from k15_plugin.rewards.answer import AnswerMatchReward, extract_answer

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def gsm8k(n: int):
    ds = load_dataset("openai/gsm8k", "main", split="train").select(range(n))
    return ds.map(
        lambda row: {
            "prompt": [{"role": "user", "content": row["question"] + "\nGive the final answer after ####."}],
            "answer": extract_answer(row["answer"], "gsm8k"),
        },
        remove_columns=ds.column_names,
    )


def step_times(algorithm: str, steps: int, data) -> list[float]:
    common = dict(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=64,
        num_generations=8,
        max_completion_length=256,
        learning_rate=1e-6,
        bf16=True,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(MODEL, padding_side="left")
    if algorithm == "kimi_md":
        trainer = KimiMirrorDescentTrainer(
            model=model,
            reward_funcs=[AnswerMatchReward("gsm8k")],
            train_dataset=data,
            args=KimiMirrorDescentConfig(**common),
            processing_class=tokenizer,
        )
    else:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[AnswerMatchReward("gsm8k")],
            train_dataset=data,
            args=GRPOConfig(**common),
            processing_class=tokenizer,
        )
    trainer.train()
    times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    del trainer, model
    torch.cuda.empty_cache()
    return times[1:]  # the first step includes vLLM and CUDA warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (A B A B ...)")
    cli = parser.parse_args()
    data = gsm8k(512)
    times = {"kimi_md": [], "grpo": []}
    for _ in range(cli.rounds):
        for algorithm in times:
            times[algorithm] += step_times(algorithm, cli.steps, data)
    medians = {k: statistics.median(v) for k, v in times.items()}
    for k, v in medians.items():
        print(f"{k:<8} median step {v:.3f} s over {len(times[k])} steps")
    print(
        json.dumps(
            {
                "bench": "gpu_step",
                "model": MODEL,
                "median_step_seconds": medians,
                "step_time_ratio": medians["kimi_md"] / medians["grpo"],
                "gpu": torch.cuda.get_device_name(),
            }
        )
    )


if __name__ == "__main__":
    main()
