"""The OpenRLHF GPU check: a few steps of k1.5 mirror descent through `k15-train host=openrlhf` on one GPU.

    python -m bench.openrlhf_gpu_check                 # one GPU; OpenRLHF 0.11 + vLLM + DeepSpeed installed, and
                                                       # Qwen2.5-0.5B-Instruct in the Hugging Face cache
    python -m bench.openrlhf_gpu_check --dry-run       # any machine with OpenRLHF: the checked command line only

What it checks that the CPU tests cannot: the plugin's Ray actor classes started by OpenRLHF (controller, DeepSpeed
ZeRO-2 policy ranks) with vLLM generation and weight sync, the k1.5 loss and baseline in real steps, the optimizer
moments zeroed on the DeepSpeed optimizer before each update, the prioritized sampler and the length penalty on a
real run, and OpenRLHF's checkpoint with the sampler state. The data are synthetic sums (no download). Last line:
one JSON object with the per-step metrics OpenRLHF logged to TensorBoard.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_data(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 9)
        prompt = f"What is {a} + {b} * {c}? Think step by step, then give the final answer as a number at the end."
        lines.append(json.dumps({"prompt": prompt, "answer": str(a + b * c)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def scalars(tensorboard_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for events in sorted(tensorboard_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="k15_openrlhf_check_"))
    data = workdir / "sums.jsonl"
    write_data(data, 96)
    run_dir = workdir / "run"
    cmd = [
        sys.executable,
        "-m",
        "k15_plugin.cli.train",
        "host=openrlhf",
        "algorithm=kimi_md",
        "algorithm.tau=0.5",
        f"model.name={args.model}",
        "model=qwen2.5_0.5b",
        "data=jsonl",
        f"data.path={data}",
        "data.heldout_size=16",
        "data.chat=true",
        "sampler=prioritized",
        "reward=length_penalty",
        "reward.length_penalty.warmup_steps=1",
        "trainer.num_generations=4",
        "trainer.per_device_train_batch_size=32",
        "trainer.max_completion_length=256",
        "trainer.learning_rate=1e-6",
        "trainer.save_steps=2",
        "trainer.eval_steps=0",
        "host.flags.train.num_episodes=1",
        f"hydra.run.dir={run_dir}",
    ]
    if args.dry_run:
        cmd.append("host.dry_run=true")
    start = time.time()
    out = subprocess.run(cmd, text=True, capture_output=True)
    sys.stderr.write(out.stdout[-6000:] + out.stderr[-6000:])
    result = {"bench": "openrlhf_gpu_check", "returncode": out.returncode, "dry_run": args.dry_run}
    if not args.dry_run:
        logged = scalars(run_dir / "openrlhf" / "tensorboard")
        keys = [k for k in logged if any(s in k for s in ("policy_loss", "k15", "reward", "response_length", "kl"))]
        result.update({k: logged[k] for k in sorted(keys)})
        result["checkpoints"] = sorted(p.name for p in (run_dir / "openrlhf" / "checkpoints").glob("*"))
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result))
    return out.returncode


if __name__ == "__main__":
    raise SystemExit(main())
