#!/usr/bin/env bash
# GPU checks (bf16 training, Liger's fused loss, vLLM colocate with sleep mode), at most ~10 minutes on one GPU, then
# the sharded runs at world size 1 (FSDP2 and DeepSpeed ZeRO-3 through accelerate launch, bf16, the 0.5B-shaped student
# at vocabulary 151,936, peak GPU memory printed), under 8 minutes together.
# On a fresh GPU machine: installs protege with its vllm and liger extras and deepspeed into .gpu-env, then runs
# scripts/gpu_check.py and scripts/gpu_sharded.py, which print one line per check. Exit status: the number of failed
# checks. SHARDED=only runs the sharded runs alone, SHARDED=no leaves them out.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .gpu-env/bin/python ]; then
    python3 -m venv .gpu-env
    .gpu-env/bin/pip install -q --upgrade pip
    .gpu-env/bin/pip install -q -e ".[vllm,liger,peft]"
fi
.gpu-env/bin/python -c "import deepspeed" 2>/dev/null || .gpu-env/bin/pip install -q deepspeed
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_ENABLE_V1_MULTIPROCESSING=0
failures=0
if [ "${SHARDED:-yes}" != "only" ]; then
    timeout 600 .gpu-env/bin/python scripts/gpu_check.py "$@"
    failures=$?
fi
if [ "${SHARDED:-yes}" != "no" ]; then
    for engine in fsdp2 zero3; do
        # The first run also builds the random models (about 3.4 GB) into runs/gpu_check/real_models.
        timeout 240 .gpu-env/bin/accelerate launch --config_file "examples/accelerate/$engine.yaml" \
            --num_processes 1 scripts/gpu_sharded.py "$engine" || {
            status=$?
            [ "$status" -eq 124 ] && echo "FAIL $engine-1gpu: over 240 s"
            failures=$((failures + 1))
        }
    done
fi
exit "$failures"
