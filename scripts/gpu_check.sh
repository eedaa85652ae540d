#!/usr/bin/env bash
# GPU checks (bf16 training, Liger's fused loss, vLLM colocate with sleep mode), at most ~10 minutes on one GPU.
# On a fresh GPU machine: installs protege with its vllm and liger extras into .gpu-env, then runs scripts/gpu_check.py,
# which prints one line per check. Exit status: the number of failed checks.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .gpu-env/bin/python ]; then
    python3 -m venv .gpu-env
    .gpu-env/bin/pip install -q --upgrade pip
    .gpu-env/bin/pip install -q -e ".[vllm,liger,peft]"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_ENABLE_V1_MULTIPROCESSING=0
timeout 600 .gpu-env/bin/python scripts/gpu_check.py "$@"
