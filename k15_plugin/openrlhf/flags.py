"""OpenRLHF's command line from a nested config, and a check of it against OpenRLHF's own parser.

OpenRLHF 0.11 names every flag with dots (``--actor.adam.lr``), so a nested Hydra node maps onto flags mechanically:
``{actor: {adam: {lr: 1e-6}}}`` -> ``--actor.adam.lr 1e-06``; ``true`` -> the bare flag (``store_true``), ``false``
and ``null`` -> omitted, a list -> its values after the flag.

OpenRLHF builds its parser inside ``if __name__ == "__main__"`` of ``openrlhf.cli.train_ppo_ray``;
:func:`capture_parser` runs that module with ``parse_args`` intercepted to get the parser without training.
:func:`check_flags` does it in a subprocess (with the import stubs of ``cpu_stubs/`` where vLLM or flash-attn are
missing) and parses the flags with it, so a wrong flag, type or choice is reported before anything starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import runpy
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

STUB_DIR = Path(__file__).resolve().parent / "cpu_stubs"
OPENRLHF_MODULE = "openrlhf.cli.train_ppo_ray"


def to_flags(node: Mapping, prefix: str = "") -> list[str]:
    """Flags for a nested mapping of OpenRLHF options, in the mapping's order."""
    argv: list[str] = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            argv += to_flags(value, f"{name}.")
        elif value is None or value is False:
            continue
        elif value is True:
            argv.append(f"--{name}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{name}", *(str(v) for v in value)]
        else:
            argv += [f"--{name}", str(value)]
    return argv


class _Captured(Exception):
    pass


def capture_parser() -> argparse.ArgumentParser:
    """OpenRLHF's own argument parser, built by running its launcher module up to ``parse_args``."""
    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        captured["parser"] = self
        raise _Captured

    argparse.ArgumentParser.parse_args = capture
    try:
        runpy.run_module(OPENRLHF_MODULE, run_name="__main__")
    except _Captured:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    if "parser" not in captured:
        raise RuntimeError(f"{OPENRLHF_MODULE} did not build an argument parser")
    return captured["parser"]


def _parse(argvs: list[list[str]]) -> list[dict]:
    """Parse each argv with OpenRLHF's parser: {"ok": true} or {"error": "<argparse's message>"} per argv."""
    parser = capture_parser()
    messages = []

    def fail(message):  # argparse's error() prints and exits; keep the message instead
        messages.append(message)
        raise _Captured

    parser.error = fail
    results = []
    for argv in argvs:
        messages.clear()
        try:
            parser.parse_args(argv)
            results.append({"ok": True})
        except _Captured:
            results.append({"error": messages[0] if messages else "rejected"})
    return results


def _missing_gpu_packages() -> bool:
    """vLLM or flash-attn is not installed (or only these stubs are on the path)."""
    specs = [importlib.util.find_spec(name) for name in ("vllm", "flash_attn")]
    return any(spec is None or str(spec.origin or "").startswith(str(STUB_DIR)) for spec in specs)


def check_flags(argv: list[str], timeout: float = 600) -> str | None:
    """None when OpenRLHF's parser accepts ``argv``; otherwise its one-line message."""
    return check_flag_sets([argv], timeout)[0]


def check_flag_sets(argvs: list[list[str]], timeout: float = 600) -> list[str | None]:
    """:func:`check_flags` for several command lines, with one start of OpenRLHF's launcher module."""
    if importlib.util.find_spec("openrlhf") is None:
        return ["OpenRLHF is not installed: pip install 'k15-plugin[openrlhf]' (README: OpenRLHF)"] * len(argvs)
    env = dict(os.environ)
    if _missing_gpu_packages():
        env["PYTHONPATH"] = os.pathsep.join([str(STUB_DIR), *filter(None, [env.get("PYTHONPATH")])])
    code = f"import json, sys; from {__name__} import _parse; print(json.dumps(_parse(json.loads(sys.argv[1]))))"
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True, env=env, timeout=timeout
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("[")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"could not load OpenRLHF's parser: {tail}"] * len(argvs)
    return [None if r.get("ok") else r["error"] for r in json.loads(lines[-1])]


def flag_of_error(message: str) -> str | None:
    """The flag an argparse message is about (``--actor.adam.lr``), if it names one."""
    found = re.search(r"(--[\w.]+)", message)
    return found.group(1) if found else None
