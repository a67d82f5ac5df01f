#!/usr/bin/env bash
# Device calls of stop 35 (carry target/gpu-tests.tar.xz: `bash scripts/gpu-tests.sh`, then
# copy into target/gpu-tests/ a gpu-bench-old built from the commit before the kernel changes,
# 4634405 (`git stash; cargo build --release -p gpu --bin gpu-bench`), then `tar -C target -cJf
# target/gpu-tests.tar.xz gpu-tests`):
#   bash scripts/dev-run.sh suite   # the whole GPU suite, the 130M training A/B, the new scan bench
#   bash scripts/dev-run.sh essential  # only the changed kernels' tests and gpu_conformance
#   bash scripts/dev-run.sh ab      # scan and 130M training, old against new; the profile
set -u
if [ ! -x /tmp/gpu-bench-old ]; then
  tar -xJf target/gpu-tests.tar.xz -C target && mv target/gpu-tests/gpu-bench-old /tmp/
fi
export VET_KERNEL_CACHE=/tmp/kc
nvidia-smi --query-gpu=name --format=csv,noheader
case "${1:-suite}" in
suite)
  timeout 330 bash scripts/gpu-tests.sh run > "$OUT/run.log" 2>&1; echo "suite rc $?"
  grep -E "^test result|FAILED|panicked|^== |staged|reference:|cuda f32:" "$OUT/run.log" | head -80
  for b in target/gpu-tests/gpu-bench /tmp/gpu-bench-old; do
    echo "== $b train 130M"; VET_TRAIN_SIZES=130M timeout 80 $b train 2>&1 | grep -E "^train|error" | head -2
  done
  echo "== new scan"; timeout 150 target/gpu-tests/gpu-bench scan 2>&1 | grep -E "^scan|error" | tail -3
  ;;
essential)
  # The tests of the changed kernels only (scan, loss, conv) and the whole-model conformance.
  for t in selective_scan loss conv1d gpu_conformance; do
    echo "== $t"; timeout 200 target/gpu-tests/$t --test-threads=1 --nocapture > "$OUT/$t.log" 2>&1; echo "rc $?"
    grep -E "^test result|FAILED|panicked|staged" "$OUT/$t.log" | head -12
  done
  echo "== new scan"; timeout 100 target/gpu-tests/gpu-bench scan 2>&1 | grep -E "^scan|error" | tail -3
  ;;
ab)
  for i in 1 2; do
    echo "== old scan"; timeout 150 /tmp/gpu-bench-old scan 2>&1 | grep -E "scan|error" | tail -6
    echo "== new scan"; timeout 100 target/gpu-tests/gpu-bench scan 2>&1 | grep -E "scan|error" | tail -6
  done
  for b in /tmp/gpu-bench-old target/gpu-tests/gpu-bench /tmp/gpu-bench-old target/gpu-tests/gpu-bench; do
    echo "== $b train 130M"; VET_TRAIN_SIZES=130M timeout 80 $b train 2>&1 | grep -E "^train|error" | head -3
  done
  timeout 60 target/gpu-tests/gpu-bench profile > "$OUT/profile.log" 2>&1
  grep -E "^profile" "$OUT/profile.log" | tail -4
  ;;
esac
