"""``k15-train`` in the test process: the checks that run before Hydra starts the job, without paying a new
process's imports of torch, transformers and TRL (about a minute on a loaded 2-core machine)."""

import sys

import pytest

import k15_plugin.cli.train as train_cli


def hydra_dirs(tmp_path):
    return [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]


def main_before_the_job(args, tmp_path, monkeypatch, capsys) -> tuple[int, str]:
    """``k15-train args`` in this process, from ``tmp_path``: (exit status, stderr). The job must not start."""

    def job_started():
        raise AssertionError("the checks passed and the Hydra job started")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["k15-train", *args, *hydra_dirs(tmp_path)])
    monkeypatch.setattr(train_cli, "_hydra_entry", job_started)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main()
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line(code, stderr, expected, tmp_path):
    """Exit 2, one ``k15-train: error:`` line containing ``expected``, no traceback, no run directory."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("k15-train: error: ") and expected in lines[0], stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()  # nothing half-written
