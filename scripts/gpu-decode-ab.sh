#!/usr/bin/env bash
# The decode step's opt-in switches side by side on the GPU machine (README, "The CUDA tier"):
# the decode tests under the default and the fully switched configuration, then `gpu-bench
# infer` at batch 1 and 8 under each configuration, the GEMV kernels alone (`gpu-bench gemv`)
# and a per-launch profile of the switched decode step (`gpu-bench decode-profile`).
#
#   bash scripts/gpu-tests.sh                       # here: build target/gpu-tests/
#   bash scripts/gpu-decode-ab.sh [BIN_DIR]         # there (default BIN_DIR: target/gpu-tests)
#
# BIN_DIR needs gpu-bench, decode and gpu_batched; copy just those to stay under the device
# tool's 64 MiB carry.
set -uo pipefail
cd "$(dirname "$0")/.."
D=${1:-target/gpu-tests}
B=$D/gpu-bench
# The defaults are all on (PDL, the fused step, gemv_lp_nl4 at batch 1); OFF is the step before.
ALL="VET_DEFAULTS=1"
OFF="VET_PDL=0 VET_DECODE_FUSE=0 VET_GEMV_KERNEL=gemv_lp"
nvidia-smi --query-gpu=name --format=csv,noheader
status=0
for cfg in "$ALL" "$OFF"; do
    for t in decode gpu_batched; do
        echo "== $t ($cfg)"
        log=$(env $cfg timeout 300 "$D/$t" --test-threads=1 2>&1) || status=1
        grep -E "test result|FAILED|panicked" <<<"$log"
    done
done
for cfg in "$OFF" "VET_DECODE_FUSE=0 VET_GEMV_KERNEL=gemv_lp" "VET_DECODE_FUSE=0" "$ALL" "VET_PDL=0"; do
    echo "== gpu-bench infer ($cfg)"
    env $cfg VET_INFER_BATCHES=1,8 timeout 200 "$B" infer 2>&1 | sed -n '/== summary/,$p' | grep -E "decode|prefill"
done
timeout 200 "$B" gemv 2>&1 | sed -n '/== summary/,$p'
env $ALL VET_INFER_SIZES=1.4B,130M VET_INFER_BATCHES=1 timeout 200 "$B" decode-profile 2>&1 | grep -v '^$'
exit $status
