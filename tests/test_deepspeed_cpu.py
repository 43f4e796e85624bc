"""DeepSpeed for real, on CPU: ZeRO-2 and ZeRO-3 through DeepSpeed's CPU accelerator and gloo, two processes started
by ``accelerate launch`` with the shipped configs (``examples/accelerate/deepspeed_zero{2,3}_cpu.yaml``, and
``deepspeed_zero3_offload_cpu.yaml`` for the optimizer offloaded to the CPU).

- ``tests/deepspeed_two_process.py`` under each config: the three TRL trainers take steps, the optimizer reset is a
  fresh AdamW's first update on DeepSpeed's own partitions, checkpoint and exact resume;
- ``k15-train`` under ZeRO-3 (the README's command, shorter): held-out evaluation before and after training through
  TRL's unwrap path (the partitioned parameters gathered), a checkpoint, the final model gathered, saved and
  reloaded with ``from_pretrained``.

Each launch starts two processes that import torch, transformers and TRL (a minute or more on a loaded 2-core machine);
the first DeepSpeed run on a machine also compiles DeepSpeed's CPU ops (its shared-memory collective, and the CPU
Adam of the offload config, a few minutes), kept in ``~/.cache/torch_extensions``. The launches share one pytest-xdist
group, so one worker starts them one after the other.
"""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "accelerate"

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="DeepSpeed is not installed (README command 2 installs it, built without CUDA ops)",
    ),
    pytest.mark.xdist_group("deepspeed_cpu"),  # the launches below run one at a time, on one worker
]


def _free_port() -> int:
    with socket.socket() as s:  # a port of its own: other tests may run torchrun on the default one at the same time
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file examples/accelerate/<config> ARGS`` from ``cwd``; fails the test on error."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    command += ["--main_process_port", str(_free_port()), *args]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    # DeepSpeed compiles its CPU ops on first use into a folder named after the op only, with this environment's
    # paths: one folder per environment, or each environment rebuilds what the other built (minutes)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _worker(config: str, out: Path, *flags: str) -> list[dict]:
    _launch(config, [str(REPO / "tests" / "deepspeed_two_process.py"), str(out), *flags], out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    return _worker("deepspeed_zero2_cpu.yaml", tmp_path_factory.mktemp("zero2"))


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    return _worker("deepspeed_zero3_cpu.yaml", tmp_path_factory.mktemp("zero3"))


@pytest.fixture(scope="module")
def zero3_offload(tmp_path_factory):
    return _worker("deepspeed_zero3_offload_cpu.yaml", tmp_path_factory.mktemp("zero3_offload"), "--reset-only")


RUNS = {
    "zero2": ("DeepSpeedZeroOptimizer", "AdamW"),
    "zero3": ("DeepSpeedZeroOptimizer_Stage3", "AdamW"),
    "zero3_offload": ("DeepSpeedZeroOptimizer_Stage3", "DeepSpeedCPUAdam"),
}


@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_the_trl_trainers_train_under_deepspeed(run, request):
    ranks = request.getfixturevalue(run)
    assert [(r["world"], r["distributed"]) for r in ranks] == [(2, "DistributedType.DEEPSPEED")] * 2
    for name in ("kimi_md", "grpo", "rloo"):
        runs = [r["trainers"][name] for r in ranks]
        assert all(t["steps"] == 2 and len(t["losses"]) == 2 for t in runs), name
        assert all(math.isfinite(x) for t in runs for x in t["losses"]), name
        assert runs[0]["moved"] > 1e-3, name  # the weights moved (lr 1e-2)
        assert runs[0]["weights"] == runs[1]["weights"], name  # both processes hold the same model


@pytest.mark.parametrize("run", ["zero2", "zero3", "zero3_offload"])
def test_the_optimizer_reset_makes_the_next_update_a_fresh_optimizers_first(run, request):
    """Two optimizer steps per rollout batch, four steps: read on DeepSpeed's own optimizer (the torch optimizer or
    DeepSpeedCPUAdam updating the fp32 partitions), the step counts go 1, 2, 1, 2 and the third update (the first after
    the reset) is a freshly built AdamW's first update from the same weights with the same gradient; the second and
    fourth are not (the check tells them apart). DeepSpeed's own view of the moments (``safe_get_full_optimizer_state``)
    stays the optimizer's: the reset zeroes the state in place (clearing it left ZeRO-2's view on the moments from
    before the reset)."""
    zero_optimizer, optimizer = RUNS[run]
    for rank in request.getfixturevalue(run):
        reset = rank["reset"]
        assert (reset["zero_optimizer"], reset["optimizer"]) == (zero_optimizer, optimizer)
        assert reset["steps"] == [[1], [2], [1], [2]]
        after_reset, others = reset["fresh_error"][1], reset["fresh_error"][::2]  # updates 3, and 2 and 4
        assert after_reset < 1e-4 and min(others) > 0.1, reset["fresh_error"]
        assert reset["resets"] >= 1
        assert reset["moments_seen_by_deepspeed"] == pytest.approx(reset["moments_held"], rel=1e-6)


@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_a_checkpoint_resumes_exactly(run, request):
    """The reset run saved at step 2 (DeepSpeed's partitioned checkpoint) and resumed ends, after four steps, on
    exactly the uninterrupted run's weights."""
    for rank in request.getfixturevalue(run):
        resume = rank["resume"]
        assert "global_step2" in resume["checkpoint"] and "rng_state_1.pth" in resume["checkpoint"]
        assert resume["steps"] == 4
        assert resume["max_difference"] == 0.0 and resume["weights"] == rank["reset"]["weights"]


def test_k15_train_under_zero3_evaluates_saves_and_reloads(tmp_path):
    """The README's ZeRO-3 command, four steps: the held-out accuracy before training, measured sharded over both
    processes with the partitioned parameters gathered, is the shipped checkpoint's; the final model is gathered,
    saved, reloads with ``from_pretrained`` and scores the accuracy the run reported after training."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from k15_plugin.data.arithmetic import evaluate_greedy, load_demo_checkpoint, make_datasets

    result = _launch(
        "deepspeed_zero3_cpu.yaml",
        [
            "-m",
            "k15_plugin.cli.train",
            "launcher=accelerate_deepspeed_zero3",
            "launcher.num_processes=2",
            "trainer.use_cpu=false",
            "trainer.max_steps=4",
            "trainer.per_device_train_batch_size=32",
            "trainer.eval_steps=0",
            "trainer.save_steps=2",
            "data.heldout_size=100",
        ],
        tmp_path,
    )
    (run_dir,) = (tmp_path / "outputs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["device"] == "cpu"
    assert result.stdout.count("held-out accuracy") == 1
    shards = sorted(p.name for p in (run_dir / "checkpoint-2" / "global_step2").iterdir())
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]

    demo, tokenizer = load_demo_checkpoint()
    _, heldout = make_datasets(seed=0, heldout_size=100)
    assert summary["eval_accuracy_before"] == pytest.approx(evaluate_greedy(demo, tokenizer, heldout)["accuracy"])
    final = AutoModelForCausalLM.from_pretrained(summary["final_model"])
    final_tokenizer = AutoTokenizer.from_pretrained(summary["final_model"])
    assert summary["eval_accuracy_after"] == pytest.approx(evaluate_greedy(final, final_tokenizer, heldout)["accuracy"])
    with torch.no_grad():
        moved = max(float((a - b).abs().max()) for a, b in zip(final.parameters(), demo.parameters(), strict=True))
    assert moved > 0 and all(torch.isfinite(p).all() for p in final.parameters())
