"""The offline GPU check (bench/gpu_check.sh) installs and starts on a machine like the lent GPU machines, before one
is lent: `gpu_check.sh --smoke` in a fresh virtual environment holding only torch, transformers, accelerate and peft,
from a folder of wheels that bench/gpu_wheels.sh downloads and builds.

The environment (about 1 min: the CPU torch wheel from local disk with pip, the others with uv where it is installed)
is kept between runs under ``$K15_GPU_CHECK_CACHE`` (default ``<tmp>/k15-gpu-check-cache``), one per Python and set of
versions; the wheels folder beside it is refreshed on every run (pip takes the wheels it already holds from it, so
only the k15-plugin wheel is rebuilt: ~15 s with PyPI reachable). The smoke itself takes about 1.5 min on 2 cores.
"""

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "bench" / "gpu_check.sh"
WHEELS = REPO / "bench" / "gpu_wheels.sh"
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
# What the GPU machines have besides Python, at this environment's versions (torch: the CPU wheel of the README).
GPU_MACHINE_PACKAGES = ("transformers", "accelerate", "peft")


def _pins() -> list[str]:
    pins = [f"torch=={torch.__version__.split('+')[0]}"]
    for name in GPU_MACHINE_PACKAGES:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def _cache() -> Path:
    path = Path(os.environ.get("K15_GPU_CHECK_CACHE") or Path(tempfile.gettempdir()) / "k15-gpu-check-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{command[:4]}...: {result.stderr[-3000:]}"
    return result


def _bare_environment() -> Path:
    """A virtual environment with only torch, transformers, accelerate and peft (and what they pull in)."""
    pins = _pins()
    key = hashlib.sha256(json.dumps([PYTHON_VERSION, pins]).encode()).hexdigest()[:12]
    venv = _cache() / f"venv-{PYTHON_VERSION}-{key}"
    python = venv / "bin" / "python"
    if (venv / "complete").exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(venv)], 120)
    # pip: the README's `pip install torch==2.13.0`, which takes the CPU wheel from local disk (uv would not look there)
    _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", pins[0]], 600)
    uv = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    rest = pins[1:]
    if uv:  # keeps the torch above (accelerate and peft accept it)
        _run([uv, "pip", "install", "-q", "--python", str(python), *rest], 600)
    else:
        _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *rest], 600)
    (venv / "complete").touch()
    return python


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what points into it (its virtual environment, the checkout on the path)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PYTHONWARNINGS": "ignore", **extra}


def test_smoke_installs_from_the_wheels_and_runs_in_a_bare_environment():
    python = _bare_environment()
    wheels = _cache() / f"wheels-{PYTHON_VERSION}"
    made = _run(["bash", str(WHEELS), str(wheels), "--python-version", PYTHON_VERSION], 600, env=_clean_env())
    assert "gpu_wheels: " in made.stdout and "MB (limit 60 MB)" in made.stdout
    names = {p.name.split("-")[0].lower() for p in wheels.glob("*.whl")}
    assert {"k15_plugin", "trl", "datasets", "hydra_core", "antlr4_python3_runtime"} <= names
    assert not names & {"torch", "transformers", "accelerate", "peft"}  # the GPU machine's own
    assert sum(p.stat().st_size for p in wheels.glob("*.whl")) <= 60_000_000
    (k15_wheel,) = wheels.glob("k15_plugin-*.whl")
    assert k15_wheel.stat().st_size < 2_000_000  # no demo checkpoints

    result = subprocess.run(
        ["bash", str(CHECK), str(wheels), "--smoke"],
        capture_output=True,
        text=True,
        timeout=1200,
        env=_clean_env(PYTHON=str(python)),
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for stage in ("1/4 environment", "2/4 install", "3/4 imports", "4/4 gpu_step"):
        assert f"gpu_check: [{stage}]" in result.stderr
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["bench"] == "gpu_step" and last["ok"], last
    assert "/site/k15_plugin" in last["k15_plugin"] and str(REPO) not in last["k15_plugin"]  # the wheel, not here
    assert last["k15_train"]["sampler"]["kind"] == "PrioritizedSampler"


def test_check_refuses_a_missing_wheels_folder_in_one_line(tmp_path):
    result = subprocess.run(
        ["bash", str(CHECK), str(tmp_path / "absent"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(PYTHON=sys.executable),
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"gpu_check: error: no folder '{tmp_path / 'absent'}'; make it on a machine with PyPI: "
        f"bash bench/gpu_wheels.sh {tmp_path / 'absent'}"
    )


@pytest.mark.parametrize(
    "script, args, message",
    [
        (CHECK, [], "usage: bash bench/gpu_check.sh WHEELS_DIR [--smoke]"),
        (CHECK, ["dir", "--fast"], "unknown argument '--fast'"),
        (WHEELS, [], "usage: bash bench/gpu_wheels.sh DIR [--python-version X.Y]"),
        (WHEELS, ["dir", "--python-version", "312"], "--python-version takes X.Y (e.g. 3.12)"),
        (WHEELS, ["dir", "--without", "numpy"], "--without numpy: not one of the wheels (trl datasets pyarrow"),
    ],
    ids=["check-usage", "check-unknown", "wheels-usage", "wheels-python-version", "wheels-without"],
)
def test_bad_arguments_stop_in_one_line(script, args, message):
    result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert message in line
