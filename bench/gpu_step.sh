#!/usr/bin/env bash
# One training step of Qwen2.5-0.5B-Instruct on GSM8K with vLLM colocate generation, k1.5 vs TRL GRPO (GPU only).
#   pip install -e ".[vllm]" && bash bench/gpu_step.sh
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m bench.gpu_step "$@"
