#!/usr/bin/env bash
# Device calls for ZeRO stage 3 layer by layer on the GPU (issue 12). Build here first:
#   bash scripts/gpu-tests.sh && mkdir -p target/gpu-tests/bench &&
#   cp "$(ls -t target/release/deps/zero_gpu-* | grep -v '\.d$' | head -1)" target/gpu-tests/bench/zero_gpu
# then on the device (carry target/gpu-tests):
#   bash scripts/dev-zero3.sh test          # gpu_zero (stages 1-3 at world 1 against the plain step)
#   bash scripts/dev-zero3.sh bench ARGS    # zero_gpu with ARGS (see trainer/benches/zero_gpu.rs)
set -uo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-tests
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nproc
case "${1:-test}" in
test)
    "$out/gpu_zero" --test-threads=1 --nocapture
    echo "== again without the engine's prefetch"
    VET_STAGE3_PREFETCH=0 "$out/gpu_zero" --test-threads=1 --nocapture gpu_zero_stage_3
    ;;
bench)
    shift
    "$out/bench/zero_gpu" "$@"
    ;;
esac
