"""Code sandbox throughput: programs per second at concurrency 1, 2 and 4 for each isolation mode, in one run.

    python -m bench.sandbox                       # allowlist (the default), denylist, none; 5 rounds
    python -m bench.sandbox --before 3bf90e0      # and the sandbox as it was at that git revision, same run
    python -m bench.sandbox --smoke               # seconds; what the test suite runs

A program is one run of a judge-style program (read two numbers, print their sum) on one input, as the code reward
runs them: through ``Sandbox.run_many``, ``concurrency`` at a time, each checked. Settings are interleaved round by
round (every mode and concurrency once per round, the first batch of each untimed: slot start-up), so a shared
machine's drift hits all of them alike. The paper quotes 120 programs per second on 16 cores; the target here is at
least 10 per second per core for the default mode.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench.common import RESULTS, write_json_line

PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"
TARGET_PER_CORE = 10.0
REPO = Path(__file__).resolve().parent.parent


def _module_at(revision: str, directory: str):
    """``k15_plugin/rewards/sandbox.py`` as it was at ``revision`` (then a single stdlib-only file), imported alone."""
    source = subprocess.run(
        ["git", "show", f"{revision}:k15_plugin/rewards/sandbox.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(directory) / "k15_sandbox_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("k15_sandbox_before", path)
    module = sys.modules["k15_sandbox_before"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(sandbox, programs: int, offset: int) -> float:
    jobs = [(PROGRAM, [f"{offset + i} {i}\n"]) for i in range(programs)]
    start = time.perf_counter()
    results = sandbox.run_many(jobs)
    seconds = time.perf_counter() - start
    got = [runs[0].stdout.strip() for runs in results]
    if got != [str(offset + 2 * i) for i in range(programs)]:
        bad = next(runs[0] for runs in results if not runs[0].ok)
        raise RuntimeError(f"a benchmark program failed: {bad}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["allowlist", "denylist", "none"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--programs", type=int, default=40, help="programs per timed batch")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", help="a git revision whose sandbox to measure alongside (e.g. 3bf90e0)")
    parser.add_argument("--smoke", action="store_true", help="allowlist only, concurrency 1 and 2, 1 round of 4")
    cli = parser.parse_args()
    if cli.smoke:
        cli.modes, cli.concurrency, cli.programs, cli.rounds = ["allowlist"], [1, 2], 4, 1

    from k15_plugin.sandbox import Sandbox

    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the weaker modes say they are weaker, once each
        factories = {
            mode: (lambda c, m=mode: Sandbox(timeout_seconds=10.0, concurrency=c, isolation=m)) for mode in cli.modes
        }
        if cli.before:
            before = _module_at(cli.before, scratch)
            factories[f"before ({cli.before})"] = lambda c: before.Sandbox(timeout_seconds=10.0, concurrency=c)
        sandboxes = {(name, c): make(c) for name, make in factories.items() for c in cli.concurrency}
        for (_, c), sandbox in sandboxes.items():  # probe and start every slot: not timed
            _batch(sandbox, c, 0)
        seconds = dict.fromkeys(sandboxes, 0.0)
        for r in range(cli.rounds):
            for key, sandbox in sandboxes.items():
                seconds[key] += _batch(sandbox, cli.programs, 1000 * r)
        for sandbox in sandboxes.values():
            if hasattr(sandbox, "close"):
                sandbox.close()
    rates = {
        name: {str(c): round(cli.programs * cli.rounds / seconds[name, c], 1) for c in cli.concurrency}
        for name in factories
    }
    cores = os.cpu_count() or 1
    print(f"programs per second ({cli.rounds} rounds x {cli.programs} programs, {cores} cores)")
    print(f"{'mode':<24}" + "".join(f"{'c=' + str(c):>10}" for c in cli.concurrency))
    for name, row in rates.items():
        print(f"{name:<24}" + "".join(f"{row[str(c)]:>10}" for c in cli.concurrency))
    best = max(rates[cli.modes[0]].values())
    result = {
        "bench": "sandbox",
        "programs_per_second": rates,
        f"{cli.modes[0]}_per_core": round(best / cores, 1),
        "target_per_core": TARGET_PER_CORE,
        "cores": cores,
    }
    if not cli.smoke:
        RESULTS.mkdir(exist_ok=True)
    write_json_line(
        result,
        save=not cli.smoke,
        machine_info=f"{platform.machine()}, {cores} cores, Python {platform.python_version()}, "
        f"Linux {platform.release()}",
    )


if __name__ == "__main__":
    main()
