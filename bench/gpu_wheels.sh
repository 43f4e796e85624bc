#!/usr/bin/env bash
# The wheels bench/gpu_check.sh installs on a GPU machine without a network, downloaded (and built) beforehand on a
# machine with PyPI:
#   bash bench/gpu_wheels.sh DIR                       # Python 3.12, x86-64 Linux (the lent GPU machines)
#   bash bench/gpu_wheels.sh DIR --python-version 3.11 # another CPython (tests/test_gpu_check.py: the local one)
#   bash bench/gpu_wheels.sh DIR --without pyarrow,pandas  # for a machine that has these (bench/gpu_check.sh checks
#                                                          # its versions against what the wheels ask for)
# DIR ends up holding exactly the wheels below (older ones there are removed), at most 60 MB in all; the last line
# says how many and how large. PYTHON picks the interpreter whose pip downloads (default python3).
#
# The GPU machine has torch, transformers, accelerate and peft (and what they need); these are the rest of what the
# check imports, found by running `gpu_check.sh --smoke` in a virtual environment holding only those four
# (tests/test_gpu_check.py does that). Pinned: the versions the check is tested with.
set -euo pipefail

WHEELS=(
  trl==1.16.0             # the host (pyproject.toml: trl>=1.16,<1.17)
  # datasets: TRL's trainers and k15_plugin.data import it. 5.0.0 is the newest that takes pyarrow 21; 5.1 asks for
  # pyarrow >= 24, whose wheel alone is 47 MB and with pandas's 12 MB leaves no room under the 60 MB limit.
  datasets==5.0.0
  pyarrow==21.0.0         # datasets' storage: 43 MB, most of the folder
  pandas==3.1.1           # imported by datasets
  python-dateutil==4.0.0  # pandas
  tzdata==2026.6          # python-dateutil 4
  dill==0.4.1             # datasets (fingerprints)
  multiprocess==0.70.19   # datasets
  xxhash==4.1.0           # datasets
  fsspec==2026.4.0        # datasets 5.0 takes fsspec <= 2026.4.0 (torch brings a newer one; this one comes first)
  requests==2.34.2        # imported by datasets 5.0
  urllib3==2.8.0          # requests
  charset-normalizer==3.5.3 # requests
  hydra-core==1.3.8       # k15-train's configuration
  omegaconf==2.3.1        # hydra-core
  math-verify==0.9.0      # k15_plugin.rewards (reward=math); tiny, so the check covers every reward
  latex2sympy2_extended==1.11.0 # math-verify
)
# Only a source distribution on PyPI: built into a wheel here (pure Python, so one wheel fits every CPython 3).
BUILD=(
  antlr4-python3-runtime==4.9.3 # omegaconf's grammar runtime (hydra-core pins 4.9.*)
)
LIMIT_BYTES=60000000 # 60 MB
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
  manylinux2014_x86_64)

die() {
  echo "gpu_wheels: error: $*" >&2
  exit 2
}

usage="usage: bash bench/gpu_wheels.sh DIR [--python-version X.Y] [--without NAME,...]"
[[ $# -ge 1 && $1 != -* ]] || die "$usage"
dir=$1
shift
pyver=3.12
without=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --python-version)
      [[ $# -ge 2 && $2 =~ ^3\.[0-9]+$ ]] || die "--python-version takes X.Y (e.g. 3.12)"
      pyver=$2
      shift 2
      ;;
    --without)
      [[ $# -ge 2 && -n $2 ]] || die "--without takes names separated by commas (e.g. pyarrow,pandas)"
      IFS=, read -r -a without <<<"$2"
      shift 2
      ;;
    *) die "unknown argument '$1'; $usage" ;;
  esac
done
for name in "${without[@]}"; do
  kept=()
  for req in "${WHEELS[@]}"; do [[ ${req%%==*} == "$name" ]] || kept+=("$req"); done
  ((${#kept[@]} < ${#WHEELS[@]})) || die "--without $name: not one of the wheels (${WHEELS[*]%%==*})"
  WHEELS=("${kept[@]}")
done
py=${PYTHON:-python3}
command -v "$py" >/dev/null || die "no '$py' here (set PYTHON)"
"$py" -m pip --version >/dev/null 2>&1 || die "'$py -m pip' does not run"
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
stage=$(mktemp -d)
src=$(mktemp -d)
trap 'rm -rf "$stage" "$src"' EXIT
start=$SECONDS

# 1. Binary wheels for the target Python and platform. --find-links: a wheel already in DIR is copied, not downloaded.
abi=cp${pyver/./}
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
echo "gpu_wheels: downloading ${#WHEELS[@]} wheels for CPython $pyver x86-64 into $dir" >&2
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --find-links "$dir" \
  --python-version "$pyver" --implementation cp --abi "$abi" --abi abi3 --abi none "${platform_args[@]}" \
  -d "$stage" "${WHEELS[@]}" || die "pip download failed (above); is PyPI reachable?"

# 2. Wheels built from source distributions (kept from an earlier run when DIR has them).
for req in "${BUILD[@]}"; do
  name=${req%%==*}
  version=${req##*==}
  stem="${name//-/_}-$version-"
  kept=("$dir/$stem"*.whl)
  if [[ -e ${kept[0]} ]]; then
    cp "${kept[0]}" "$stage/"
  else
    echo "gpu_wheels: building $req (source only on PyPI)" >&2
    "$py" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-binary "$name" -w "$stage" "$req" \
      || die "building $req failed (above)"
  fi
  built=("$stage/$stem"*.whl)
  [[ ${built[0]} == *-none-any.whl ]] || die "$req built a platform wheel (${built[0]##*/}); build it on CPython $pyver x86-64"
done

# 3. k15-plugin from this checkout, without the demo checkpoints (12 MB; the check builds its models in code).
echo "gpu_wheels: building k15-plugin from $repo (without k15_plugin/data/demo_checkpoint*)" >&2
tar -C "$repo" --exclude=__pycache__ --exclude='k15_plugin/data/demo_checkpoint*' -cf - pyproject.toml README.md \
  k15_plugin conf | tar -C "$src" -xf -
"$py" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$stage" "$src" >&2 \
  || die "building the k15-plugin wheel failed (above)"

# 4. The size limit, then DIR holds exactly these wheels.
total=$(du -cb "$stage"/*.whl | tail -1 | cut -f1)
(cd "$stage" && ls -S1 -- *.whl | while read -r f; do
  printf '  %7.2f MB  %s\n' "$(($(stat -c %s "$f") / 10000))e-2" "$f"
done) >&2
((total <= LIMIT_BYTES)) || die "the wheels come to $total bytes, over the $LIMIT_BYTES-byte limit"
rm -f "$dir"/*.whl
mv "$stage"/*.whl "$dir"/
printf 'gpu_wheels: %d wheels, %.1f MB (limit %d MB), CPython %s x86-64, in %s (%d s)\n' \
  "$(ls "$dir"/*.whl | wc -l)" "${total}e-6" $((LIMIT_BYTES / 1000000)) "$pyver" "$dir" $((SECONDS - start))
