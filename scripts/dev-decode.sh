#!/usr/bin/env bash
# Device call for the persistent decode kernel (carry target/gpu-tests.tar.xz with a
# gpu-bench-old from the build before): its bit test under each warp grouping and prefetch,
# then the decode bench, the old build against this one's variants (VARIANTS: env settings,
# space-separated, commas between a variant's settings).
set -u
tar -xJf target/gpu-tests.tar.xz -C target
export VET_KERNEL_CACHE=/tmp/kc
nvidia-smi --query-gpu=name --format=csv,noheader
T=target/gpu-tests
VARIANTS=${VARIANTS:-VET_DECODE_GROUPS=1 VET_DECODE_GROUPS=2 VET_DECODE_GROUPS=2,VET_DECODE_PF=4 VET_DECODE_GROUPS=2,VET_DECODE_PF=8}
for v in ${TEST_VARIANTS:-VET_DECODE_GROUPS=1 VET_DECODE_GROUPS=2,VET_DECODE_PF=6}; do
  echo "== gpu_persistent $v"
  env ${v//,/ } timeout 120 $T/gpu_persistent --test-threads=1 --nocapture > "$OUT/persist-$v.log" 2>&1; echo "rc $?"
  grep -E "^test result|panicked" "$OUT/persist-$v.log" | tail -3
done
export VET_INFER_BATCHES=1
for sz in ${SIZES:-1.4B 370M}; do
  for run in 1 2; do
    echo "== $sz old"; VET_INFER_SIZES=$sz timeout 60 $T/gpu-bench-old infer 2>&1 | grep -E "decode batch|error"
    for v in $VARIANTS; do
      echo "== $sz $v"; env ${v//,/ } VET_INFER_SIZES=$sz timeout 60 $T/gpu-bench infer 2>&1 | grep -E "decode batch|error"
    done
  done
done
for v in $VARIANTS; do
  echo "== trace 1.4B $v"; env ${v//,/ } VET_DECODE_TRACE=1 VET_INFER_SIZES=1.4B timeout 60 $T/gpu-bench infer 2>&1 | grep -E "per layer"
done
