"""Each benchmark runs with its smallest settings, so the benchmarks cannot rot (no timing assertions here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "bench, keys",
    [
        ("overhead", ["step_time_ratio_median", "rss_ratio"]),
        ("sample_efficiency", ["k15_final_acc", "grpo_final_acc", "k15_samples_to_target", "grpo_samples_to_target"]),
        ("length_penalty", ["tokens_ratio", "accuracy_delta"]),
        ("gpu_step", ["step_time_ratio", "weights_changed_by_one_lr1e-6_step", "k15_train"]),
    ],
)
def test_benchmark_smoke(bench, keys):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{bench}", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["bench"] == bench
    for key in keys:
        assert key in last, key
