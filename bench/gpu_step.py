"""The GPU check: training-step time of k1.5 vs TRL's GRPO on a 0.5B model, then `k15-train` on the GPU.

    bash bench/gpu_check.sh WHEELS    # on a GPU machine, offline: the wheels of bench/gpu_wheels.sh, then this
    bash bench/gpu_step.sh            # on a GPU machine after the README's install (+ ".[vllm]" for vLLM)
    python -m bench.gpu_step --smoke  # seconds on CPU, a tiny model: checks the plumbing (the test suite runs it)

1. Step time: `KimiMirrorDescentTrainer` and TRL's `GRPOTrainer` with identical settings (8 prompts x 8 samples,
   bf16 compute on float32 master weights, lr 1e-6, 2 optimizer steps per rollout batch), alternating runs; TRL's own
   `step_time` metric, first step dropped (up to 128 new tokens). Also the share of weights a single lr-1e-6 step
   changes, and each trainer's peak GPU memory.
2. `k15-train` on the GPU: `experiment=gsm8k_qwen0.5b` for 4 steps (completions up to 128 tokens) with held-out
   evaluation on the GPU, the length penalty on from step 0 and the prioritized sampler, a checkpoint at the last step
   (the sampler's statistics are read back from it); vLLM colocate generation when vLLM is installed.

Qwen2.5-0.5B-Instruct and GSM8K come from the Hugging Face cache or Hub. A machine without either (an offline GPU
box) runs the same code on a model of Qwen2.5-0.5B's architecture with random weights and a synthetic arithmetic
JSONL file, and says so in the result. `--time-limit` keeps the whole run inside a budget (a second timing round is
skipped when it would not leave the `k15-train` run its share). Progress goes to standard error; the last line on
standard output is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
# Qwen2.5-0.5B's architecture, for machines that cannot download it (random weights: timing, not learning)
QWEN_0_5B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)
TINY = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def _progress(message: str) -> None:
    print(f"gpu_step: {message}", file=sys.stderr, flush=True)


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _model_source(smoke: bool, workdir: Path) -> tuple[str, bool]:
    """A directory (or Hub id) holding the model and its tokenizer; True when it is the real Qwen checkpoint."""
    if not smoke:
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(MODEL), True
        except Exception:  # offline: no cache, no Hub
            pass
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from k15_plugin.data.build.warm_start import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        **(TINY if smoke else QWEN_0_5B),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = workdir / "model"
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), False


def _gsm8k_rows(n: int) -> list[dict] | None:
    try:
        from datasets import load_dataset

        from k15_plugin.rewards.answer import extract_answer

        ds = load_dataset("openai/gsm8k", "main", split="train").select(range(n))
        return [{"prompt": r["question"], "answer": extract_answer(r["answer"], "gsm8k")} for r in ds]
    except Exception:  # offline
        return None


def _arithmetic_rows(n: int) -> list[dict]:
    from k15_plugin.data.arithmetic import make_datasets

    train, _ = make_datasets(num_train=n, seed=0)
    return [{"prompt": p, "answer": a} for p, a in zip(train["prompt"], train["answer"], strict=True)]


def _length_reward(completion_ids, **kwargs):
    """Signal on any model, trained or random: shorter completions score higher."""
    return [1.0 / (1 + len(ids)) for ids in completion_ids]


def step_times(algorithm: str, source: str, rows: list[dict], steps: int, smoke: bool) -> dict:
    """One run of `steps` training steps: TRL's step times (the first dropped), the share of weights the first step
    changed, and the peak GPU memory (GiB; None on CPU)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from k15_plugin import KimiMirrorDescentConfig, KimiMirrorDescentTrainer

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    common = dict(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=32,
        steps_per_generation=2,
        num_generations=8,
        max_completion_length=16 if smoke else 128,
        learning_rate=1e-6,
        bf16=cuda,
        use_cpu=not cuda,
        use_vllm=cuda and _vllm_installed(),
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        gradient_checkpointing=False,
        disable_tqdm=True,  # gpu_step prints a line per run
    )
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)  # fp32 master weights
    tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
    data = Dataset.from_list(rows)
    if algorithm == "kimi_md":
        config, trainer_cls = KimiMirrorDescentConfig(**common), KimiMirrorDescentTrainer
    else:
        config, trainer_cls = GRPOConfig(**common, loss_type="grpo"), GRPOTrainer
    trainer = trainer_cls(
        model=model, reward_funcs=[_length_reward], train_dataset=data, args=config, processing_class=tokenizer
    )
    # kept on the CPU, so the copy does not count in the trainer's peak GPU memory
    before = {n: p.detach().to("cpu", copy=True) for n, p in trainer.model.named_parameters()}
    first = {}

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                changed = sum(int((p.detach().cpu() != before[n]).sum()) for n, p in model.named_parameters())
                first["changed"] = changed / sum(p.numel() for p in before.values())

    trainer.add_callback(FirstStep())
    trainer.train()
    times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    before.clear()
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"times": times[1:], "changed": first["changed"], "peak_gib": peak}


def _sampler_state(run_dir: Path) -> dict | None:
    """What the prioritized sampler saved with the run's last checkpoint: prompts scored and attempts counted."""
    from k15_plugin.trl.samplers import SAMPLER_STATE_NAME

    paths = sorted(run_dir.glob(f"checkpoint-*/{SAMPLER_STATE_NAME}"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not paths:
        return None
    state = torch.load(paths[-1], weights_only=False)
    attempts = state["tracker"]["attempts"]
    return {
        "kind": state["kind"],
        "checkpoint": paths[-1].parent.name,
        "prompts_scored": int((attempts > 0).sum()),
        "attempts": int(attempts.sum()),
    }


def cli_run(source: str, real_model: bool, rows: list[dict] | None, workdir: Path, smoke: bool, timeout: float) -> dict:
    """`k15-train experiment=gsm8k_qwen0.5b` for a few steps (offline: the same recipe on local files), with the
    length penalty (on from step 0) and the prioritized sampler."""
    cuda = torch.cuda.is_available()
    run_dir = workdir / "cli_run"
    steps = 4
    args = [
        "experiment=gsm8k_qwen0.5b",
        f"trainer.max_steps={steps}",
        "trainer.eval_steps=2",
        "trainer.eval_size=16",
        "data.heldout_size=32",
        # the recipe's 512 would spend the time budget on a random model, which never stops early
        f"trainer.max_completion_length={128 if cuda else 8}",
        "reward=length_penalty",
        "reward.length_penalty.warmup_steps=0",
        "reward.length_penalty.ramp_steps=0",
        "sampler=prioritized",
        f"trainer.save_steps={steps}",  # a checkpoint at the last step, holding the sampler's state
        "trainer.save_final_model=false",
        "trainer.logging_steps=1",
        "trainer.report_to=[]",
        f"trainer.use_vllm={str(cuda and _vllm_installed()).lower()}",
        f"hydra.run.dir={run_dir}",
    ]
    if not real_model:
        args += [f"model.path={source}"]
    if rows is None:  # no GSM8K: the same recipe on a local JSONL file
        path = workdir / "train.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _arithmetic_rows(512)))
        args += ["data=jsonl", f"data.path={path}", "data.chat=false"]
    if not cuda:  # --smoke on a CPU machine
        args += [
            "trainer.use_cpu=true",
            "trainer.bf16=false",
            "trainer.per_device_train_batch_size=16",
        ]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start = time.time()
    command = [sys.executable, "-m", "k15_plugin.cli.train", *args]
    try:
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"k15-train did not finish within {timeout:.0f} s (the time limit)"}
    if out.returncode != 0:
        return {"ok": False, "error": out.stderr[-1500:]}
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "ok": True,
        "seconds": round(time.time() - start, 1),
        "device": summary.get("device"),
        "accuracy_before_after": [summary["eval_accuracy_before"], summary["eval_accuracy_after"]],
        "periodic_heldout_evals": sum("heldout/accuracy" in r for r in records),
        "l2_loss": [r["k15/l2_loss"] for r in records if "k15/l2_loss" in r],
        "length_penalty_weight": [r["length_penalty/weight"] for r in records if "length_penalty/weight" in r],
        "sampler": _sampler_state(run_dir),
        "steps": summary["steps"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps per run (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (A B A B ...)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the plumbing")
    parser.add_argument(
        "--time-limit", type=float, default=0, help="seconds for the whole run (0: none); rounds past one are skipped"
    )
    cli = parser.parse_args()
    if cli.smoke:
        cli.steps, cli.rounds = 3, 1
    start = time.monotonic()
    deadline = start + cli.time_limit if cli.time_limit > 0 else math.inf
    cli_share = 60 if cli.smoke else 180  # seconds a timing round must leave for the k15-train run
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        source, real_model = _model_source(cli.smoke, workdir)
        gsm8k = None if cli.smoke else _gsm8k_rows(256)
        rows = gsm8k or _arithmetic_rows(256)
        _progress(
            f"model {'Qwen2.5-0.5B-Instruct' if real_model else 'random weights'} ({time.monotonic() - start:.0f} s)"
        )
        times, changed, peak = {"kimi_md": [], "grpo": []}, {}, {"kimi_md": None, "grpo": None}
        rounds, last_round = 0, 0.0
        for r in range(cli.rounds):
            round_start = time.monotonic()
            if r > 0 and round_start + last_round + cli_share > deadline:
                _progress(f"round {r + 1} skipped: it would not leave {cli_share} s of the time limit")
                break
            for algorithm in times:
                run = step_times(algorithm, source, rows, cli.steps, cli.smoke)
                times[algorithm] += run["times"]
                changed[algorithm] = run["changed"]
                if run["peak_gib"] is not None:
                    peak[algorithm] = max(peak[algorithm] or 0.0, run["peak_gib"])
                _progress(
                    f"round {r + 1} {algorithm}: steps {', '.join(f'{t:.3f}' for t in run['times'])} s"
                    + (f", peak {run['peak_gib']:.2f} GiB" if run["peak_gib"] is not None else "")
                )
            last_round = time.monotonic() - round_start
            rounds += 1
        medians = {k: statistics.median(v) for k, v in times.items()}
        timeout = min(1800.0, max(30.0, deadline - time.monotonic() - 10))
        _progress(f"k15-train experiment=gsm8k_qwen0.5b, {timeout:.0f} s at most")
        cli_result = cli_run(source, real_model, gsm8k, workdir, cli.smoke, timeout)
        _progress(f"k15-train: {'ok' if cli_result['ok'] else 'FAILED'} ({time.monotonic() - start:.0f} s in all)")
    for k, v in medians.items():
        print(f"{k:<8} median step {v:.3f} s over {len(times[k])} steps")
    checks = _checks(times, changed, peak, cli_result)
    model = MODEL if real_model else "Qwen2.5-0.5B architecture, random weights (offline)"
    if cli.smoke:
        model = "tiny Qwen2, random weights (smoke)"
    import k15_plugin

    print(
        json.dumps(
            {
                "bench": "gpu_step",
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "torch": torch.__version__,
                "k15_plugin": str(Path(k15_plugin.__file__).parent),  # the installed wheel under gpu_check.sh
                "model": model,
                "data": "gsm8k" if gsm8k else "synthetic arithmetic (offline)",
                "vllm": torch.cuda.is_available() and _vllm_installed(),
                "rounds": rounds,
                "median_step_seconds": {k: round(v, 4) for k, v in medians.items()},
                "step_time_ratio": round(medians["kimi_md"] / medians["grpo"], 3),
                "weights_changed_by_one_lr1e-6_step": {k: round(v, 4) for k, v in changed.items()},
                "peak_gpu_memory_gib": {k: None if v is None else round(v, 2) for k, v in peak.items()},
                "k15_train": cli_result,
                "seconds": round(time.monotonic() - start, 1),
                "checks": checks,
                "ok": all(checks.values()),
            }
        )
    )
    if not all(checks.values()):
        _progress(f"FAILED: {', '.join(name for name, passed in checks.items() if not passed)}")
        sys.exit(1)


def _checks(times: dict, changed: dict, peak: dict, cli: dict) -> dict[str, bool]:
    """What the run must show; on a GPU also that training, evaluation and the memory figures were on it."""
    checks = {
        "both_trainers_timed": all(times.values()),
        "one_lr1e-6_step_changes_weights": all(v > 0 for v in changed.values()),
        "k15_train_ran": cli["ok"],
        "heldout_evaluated_during_training": cli.get("periodic_heldout_evals", 0) >= 1,
        "length_penalty_on": any(w > 0 for w in cli.get("length_penalty_weight", [])),
        "prioritized_sampler_fed": (cli.get("sampler") or {}).get("attempts", 0) > 0,
    }
    if torch.cuda.is_available():
        checks["k15_train_on_gpu"] = str(cli.get("device", "")).startswith("cuda")
        checks["peak_gpu_memory_measured"] = all(v is not None and v > 0 for v in peak.values())
    return checks


if __name__ == "__main__":
    main()
