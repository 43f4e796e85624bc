#!/usr/bin/env bash
# The GPU check (bench/gpu_step.py): k1.5 vs TRL GRPO step time on a 0.5B model, then k15-train on the GPU.
#   pip install -e ".[vllm]" && bash bench/gpu_step.sh        (vLLM optional; without it TRL generates with HF)
# On a GPU machine without a network, from a folder of wheels instead of the install: bench/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m bench.gpu_step "$@"
