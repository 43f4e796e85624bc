"""The single-file reference example still runs end to end (a few steps)."""

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "k15_minimal.py"


def test_k15_minimal_runs(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--max-steps", "3", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # the hand-checkable numbers of show_the_math(): gradients -0.1 / 0.15, length reward (1/6, -1/2, 0, -1/6)
    assert "d loss / d logp = [-0.1" in result.stdout
    assert "held-out greedy accuracy" in result.stdout
    assert len(EXAMPLE.read_text().splitlines()) <= 300
