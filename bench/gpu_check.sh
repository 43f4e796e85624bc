#!/usr/bin/env bash
# The GPU check on a machine without a network: bench/gpu_step.py, with what it needs installed from a folder of wheels.
#   bash bench/gpu_wheels.sh WHEELS          # beforehand, on a machine with PyPI (at most 60 MB of wheels)
#   bash bench/gpu_check.sh WHEELS           # on the GPU machine: 8 minutes at most on one H100
#   bash bench/gpu_check.sh WHEELS --smoke   # on any machine: the same install, then a few CPU steps on a tiny model
# The machine needs Python (PYTHON, default python3) with torch, transformers, accelerate and peft; the wheels bring
# the rest. They are installed with `pip install --no-index --no-deps --target` into a fresh folder that goes first on
# PYTHONPATH (its bin/ on PATH); gpu_step.py then runs outside the checkout, so k15_plugin is the installed wheel's.
# Each stage has a time limit and says so when it runs past it. Progress lines go to standard error; the last line on
# standard output is gpu_step's JSON. K15_GPU_CHECK_KEEP=1 keeps the work folder (installed wheels, run files).
set -euo pipefail

start=$SECONDS
stage=setup
die() {
  echo "gpu_check: error: $*" >&2
  exit 2
}
say() {
  printf 'gpu_check: [%s] %s (%d s)\n' "$stage" "$*" $((SECONDS - start)) >&2
}
# run_stage LIMIT COMMAND...: COMMAND under `timeout` (its child processes too), one clear line if it fails or runs over
run_stage() {
  local limit=$1 rc=0
  shift
  timeout --kill-after=20 "$limit" "$@" || rc=$?
  if ((rc == 124 || rc == 137)); then
    die "[$stage] did not finish within its limit of $limit s"
  fi
  ((rc == 0)) || die "[$stage] failed (exit code $rc; its output is above)"
}

usage="usage: bash bench/gpu_check.sh WHEELS_DIR [--smoke]   (WHEELS_DIR from: bash bench/gpu_wheels.sh WHEELS_DIR)"
[[ $# -ge 1 && $1 != -* ]] || die "$usage"
dir=$1
shift
smoke=false
for arg in "$@"; do
  case $arg in
    --smoke) smoke=true ;;
    *) die "unknown argument '$arg'; $usage" ;;
  esac
done
# The whole check's budget: the GPU run must fit 8 minutes on one H100; the smoke runs on slow shared CPUs.
if $smoke; then budget=900; else budget=480; fi
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
command -v "$py" >/dev/null || die "no '$py' on PATH (set PYTHON to the interpreter that has torch)"
command -v timeout >/dev/null || die "no 'timeout' (GNU coreutils) on PATH"

stage="1/4 environment"
say "$($py --version 2>&1) at $(command -v "$py"); $($smoke && echo 'smoke: CPU, tiny model' || echo 'GPU run')"
run_stage 120 "$py" - "$smoke" <<'EOF'
import importlib
import sys

smoke = sys.argv[1] == "true"
found, missing = [], []
for name in ("torch", "transformers", "accelerate", "peft"):
    try:
        found.append(f"{name} {importlib.import_module(name).__version__}")
    except ImportError as e:
        missing.append(f"{name} ({e})")
if missing:
    sys.exit(f"gpu_check: error: not importable by {sys.executable}: {', '.join(missing)}; the machine must have them")
import torch

cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"gpu_check: {', '.join(found)}; {cuda}", file=sys.stderr)
if not smoke and not torch.cuda.is_available():
    sys.exit("gpu_check: error: torch sees no CUDA device; on a machine without a GPU run it with --smoke")
EOF

stage="2/4 install"
[[ -d $dir ]] || die "no folder '$dir'; make it on a machine with PyPI: bash bench/gpu_wheels.sh $dir"
dir=$(cd "$dir" && pwd)
wheels=("$dir"/*.whl)
[[ -e ${wheels[0]} ]] || die "no wheels in $dir; make them on a machine with PyPI: bash bench/gpu_wheels.sh $dir"
compgen -G "$dir/k15_plugin-*.whl" >/dev/null || die "no k15_plugin wheel in $dir (bash bench/gpu_wheels.sh $dir makes one)"
twice=$(for w in "${wheels[@]}"; do w=${w##*/}; echo "${w%%-*}" | tr '[:upper:].' '[:lower:]_'; done | sort | uniq -d)
[[ -z $twice ]] || die "$dir holds two versions of: $twice (remake the folder with bench/gpu_wheels.sh)"
# Wheels made for another Python or processor would stop pip with a less plain message: say which, and what to run.
pyxy=$("$py" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
arch=$(uname -m)
foreign=()
for w in "${wheels[@]}"; do
  IFS=- read -r -a parts <<<"${w##*/}"
  n=${#parts[@]}
  pytags=${parts[n - 3]} abitag=${parts[n - 2]} plat=${parts[n - 1]%.whl}
  [[ $plat == any || $plat == *_$arch* ]] || foreign+=("${w##*/}")
  [[ .$pytags. == *.py3.* || .$pytags. == *.cp$pyxy.* || .$pytags. == *.py$pyxy.* || $abitag == abi3 ]] \
    || foreign+=("${w##*/}")
done
((${#foreign[@]} == 0)) || die "not for CPython ${pyxy:0:1}.${pyxy:1} on $arch: ${foreign[*]}; make the folder with:" \
  "bash bench/gpu_wheels.sh $dir --python-version ${pyxy:0:1}.${pyxy:1}"
work=$(mktemp -d "${TMPDIR:-/tmp}/k15-gpu-check.XXXXXX")
if [[ ${K15_GPU_CHECK_KEEP:-0} == 1 ]]; then
  trap 'echo "gpu_check: work folder kept: $work" >&2' EXIT
else
  trap 'rm -rf "$work"' EXIT
fi
site=$work/site
say "${#wheels[@]} wheels ($(du -cb "${wheels[@]}" | tail -1 | awk '{printf "%.1f MB", $1 / 1e6}')) into $site"
run_stage 300 "$py" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
  --no-warn-script-location --target "$site" "${wheels[@]}"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$site/bin:$PATH"
# Offline: no Hub look-up may wait on a network (gpu_step.py falls back to a random model and synthetic data).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TMPDIR=$work/tmp # gpu_step's model, run directories and checkpoints: removed with the work folder
mkdir -p "$TMPDIR"
cd "$work" # nothing of the checkout on sys.path: the imports below and the check use the installed wheels

stage="3/4 imports"
say "checking the imports come from $site"
run_stage 180 "$py" - "$site" <<'EOF'
import importlib
import importlib.metadata
import sys
from pathlib import Path

site = Path(sys.argv[1]).resolve()
modules = {"trl": "trl", "datasets": "datasets", "pyarrow": "pyarrow", "pandas": "pandas", "hydra": "hydra-core",
           "omegaconf": "omegaconf", "math_verify": "math-verify", "k15_plugin": "k15-plugin"}
for name in (*modules, "k15_plugin.cli.train", "k15_plugin.trl", "trl.trainer.grpo_trainer"):
    try:
        importlib.import_module(name)
    except ImportError as e:
        sys.exit(f"gpu_check: error: import {name}: {e} (neither the wheels nor this machine provide it?)")
versions = [f"{dist} {importlib.metadata.version(dist)}" for dist in modules.values()]
k15 = Path(sys.modules["k15_plugin"].__file__).resolve()
if site not in k15.parents:
    sys.exit(f"gpu_check: error: k15_plugin comes from {k15.parent}, not from the installed wheel in {site}")
print(f"gpu_check: {', '.join(versions)}", file=sys.stderr)

# What the installed wheels ask for, against what this Python finds first (the wheels, then the machine's own).
from packaging.requirements import Requirement
from packaging.version import Version

conflicts, absent = [], set()
for dist in importlib.metadata.distributions(path=[str(site)]):
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            found = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            absent.add(req.name)
            continue
        if not req.specifier.contains(Version(found), prereleases=True):
            conflicts.append(f"{dist.metadata['Name']} {dist.version} asks for {req.name}{req.specifier}, found {found}")
if absent:  # k15-plugin's plotting and TensorBoard logging: the check runs without them
    print(f"gpu_check: not installed, and not used by the check: {', '.join(sorted(absent))}", file=sys.stderr)
if conflicts:
    sys.exit("gpu_check: error: " + "; ".join(conflicts))
EOF
command -v k15-train >/dev/null || die "[$stage] the wheel installed no k15-train script in $site/bin"

stage="4/4 gpu_step"
left=$((budget - (SECONDS - start) - 25)) # 25 s for the kill grace and the stage's own start
((left >= 120)) || die "only $left s of the $budget s budget left for the check itself"
args=(--time-limit $((left - 20)))
if $smoke; then
  args+=(--smoke)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
say "python bench/gpu_step.py ${args[*]} ($left s at most)"
run_stage "$left" "$py" "$repo/bench/gpu_step.py" "${args[@]}"
say "done"
