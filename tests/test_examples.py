"""The single-file reference example still runs end to end (a few steps), as a script, in this process."""

import runpy
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "k15_minimal.py"


def test_k15_minimal_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--max-steps", "3", "--output-dir", str(tmp_path / "out")])
    try:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    finally:
        torch.set_num_threads(1)
    out = capsys.readouterr().out
    # the hand-checkable numbers of show_the_math(): gradients -0.1 / 0.15, length reward (1/6, -1/2, 0, -1/6)
    assert "d loss / d logp = [-0.1" in out
    assert "held-out greedy accuracy" in out
    assert len(EXAMPLE.read_text().splitlines()) <= 300
