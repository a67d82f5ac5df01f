#!/usr/bin/env bash
# Device calls of stops 38 and 39 (carry target/gpu-tests.tar.xz; `branch`, `ab` and `final`
# also need the other build their comment names beside this one):
#   bash scripts/dev-int8.sh int8    # int8 tests, then decode bf16 against int8
#   bash scripts/dev-int8.sh branch  # branch decode-groups-wip's persistent kernel against this build
#   bash scripts/dev-int8.sh fast    # int8 GEMVs and decode, bf16 against int8; the int8 tests
#   bash scripts/dev-int8.sh ab      # this build against gpu-tests/fast/ (another int8 layout)
#   bash scripts/dev-int8.sh final   # bf16 against gpu-tests/base/, the trace, the suite
#   bash scripts/dev-int8.sh suite   # the whole GPU suite
set -u
[ -x target/gpu-tests/gpu-bench ] || tar -xJf target/gpu-tests.tar.xz -C target
export VET_KERNEL_CACHE=/tmp/kc
nvidia-smi --query-gpu=name --format=csv,noheader
T=target/gpu-tests
case "${1:-int8}" in
int8)
  for t in gpu_int8 gpu_persistent decode; do
    timeout 200 $T/$t --test-threads=1 --nocapture > "$OUT/$t.log" 2>&1; echo "== $t rc $?"
    grep -E "^test result|panicked|int8|FAIL|tiny|same bits|alone" "$OUT/$t.log" | grep -v "^  " | head -40
  done
  ids=1,2,3,40,41,42
  for d in "--precision bf16" "--dtype int8"; do
    echo "== vet-chat --device cuda $d"; $T/vet-chat --model fixtures/tiny --device cuda $d --tokens $ids --greedy --max-new-tokens 24 2>&1 | tail -2
  done
  for sz in 1.4B 130M; do
    for v in VET_INFER_INT8=0 VET_INFER_INT8=1 VET_INFER_INT8=1,VET_DECODE_PERSIST=0 VET_INFER_INT8=1,VET_DECODE_PERSIST=1; do
      echo "== $sz $v"
      env ${v//,/ } VET_INFER_BATCHES=1,8 VET_INFER_SIZES=$sz timeout 100 $T/gpu-bench infer 2>&1 | grep -E "decode batch|rror" | sort -u
    done
  done
  ;;
branch)
  export VET_INFER_BATCHES=1
  for run in 1 2; do
    echo "== 1.4B this build"; VET_INFER_SIZES=1.4B timeout 60 $T/gpu-bench infer 2>&1 | grep -E "decode batch|rror"
    for g in 1 2; do
      echo "== 1.4B branch groups $g"; VET_DECODE_GROUPS=$g VET_INFER_SIZES=1.4B timeout 60 $T/gpu-bench-branch infer 2>&1 | grep -E "decode batch|rror"
    done
  done
  echo "== gpu_persistent (branch)"; timeout 250 $T/gpu_persistent-branch --test-threads=1 --nocapture > "$OUT/persist.log" 2>&1; echo "rc $?"; grep -E "^test result|panicked" "$OUT/persist.log" | tail -3
  ;;
fast)
  # The int8 GEMVs (1.4B shapes, one row) and decode, bf16 against int8; then the int8 tests.
  timeout 120 $T/gpu-bench gemv > "$OUT/gemv.log" 2>&1; echo "== gemv rc $?"
  grep -E "copy of|1.4B (in|out)_proj.*rows 1:|130M in_proj.*rows 1:" -A 11 "$OUT/gemv.log" | grep -E "copy of|rows 1:|nl4 split 1|nl8 split 1|gemv_lp split [12]:" | head -40
  for sz in 1.4B 130M; do
    for v in VET_INFER_INT8=0 VET_INFER_INT8=1 VET_INFER_INT8=1,VET_DECODE_PERSIST=0; do
      echo "== $sz $v"
      env ${v//,/ } VET_INFER_BATCHES=1,8 VET_INFER_SIZES=$sz timeout 100 $T/gpu-bench infer 2>&1 | grep -E "decode batch|rror" | sort -u
    done
  done
  for t in gpu_int8 gpu_persistent decode; do
    timeout 200 $T/$t --test-threads=1 --nocapture > "$OUT/$t.log" 2>&1; echo "== $t rc $?"
    grep -E "^test result|panicked" "$OUT/$t.log" | head -10
  done
  ;;
ab)
  # This build (16 codes a lane) against gpu-tests/fast/ (8 codes a lane, no I2F).
  F=$T/fast
  for b in $F $T; do
    timeout 100 $b/gpu-bench gemv > "$OUT/gemv-$(basename $b).log" 2>&1; echo "== gemv $b rc $?"
    grep -E "copy of|int8 rows 1:" -A 11 "$OUT/gemv-$(basename $b).log" | grep -E "copy of|int8 rows 1:|nl4 split 1|gemv_lp split 1:" | head -24
  done
  for sz in 1.4B 130M; do
    for run in "$T VET_INFER_INT8=0" "$F VET_INFER_INT8=1" "$T VET_INFER_INT8=1" "$F VET_INFER_INT8=1,VET_DECODE_PERSIST=0" "$T VET_INFER_INT8=1,VET_DECODE_PERSIST=0"; do
      set -- $run
      echo "== $sz $1 $2"
      env ${2//,/ } VET_INFER_BATCHES=1,8 VET_INFER_SIZES=$sz timeout 100 $1/gpu-bench infer 2>&1 | grep -E "decode batch|rror" | sort -u
    done
  done
  for b in $T $F; do
    for t in gpu_int8 gpu_persistent decode; do
      timeout 200 $b/$t --test-threads=1 --nocapture > "$OUT/$t-$(basename $b).log" 2>&1; echo "== $b/$t rc $?"
      grep -E "^test result|panicked|alone" "$OUT/$t-$(basename $b).log" | head -12
    done
  done
  ;;
final)
  # bf16 decode before (gpu-tests/base: 228bacf) and after one split at every batch; the
  # persistent kernel's phases (bf16, int8); then the whole GPU suite in the time left.
  for sz in 1.4B 130M; do
    for b in $T/base $T; do
      echo "== $sz bf16 $b"; VET_INFER_BATCHES=1,8 VET_INFER_SIZES=$sz timeout 60 $b/gpu-bench infer 2>&1 | grep -E "decode batch|rror" | sort -u
    done
  done
  for v in 0 1; do
    echo "== 1.4B trace int8=$v"; VET_DECODE_TRACE=1 VET_INFER_INT8=$v VET_INFER_BATCHES=1 VET_INFER_SIZES=1.4B timeout 60 $T/gpu-bench infer 2>&1 | grep -E "decode batch|rror"
  done
  left=$((${FINAL_LIMIT:-575} - SECONDS)); echo "== suite with ${left} s"
  timeout $left bash scripts/gpu-tests.sh run > "$OUT/run.log" 2>&1; echo "suite rc $?"
  grep -E "^test result|FAILED|panicked|^== |reference:|cuda f32:" "$OUT/run.log" | head -90
  ;;
suite)
  timeout 560 bash scripts/gpu-tests.sh run > "$OUT/run.log" 2>&1; echo "suite rc $?"
  grep -E "^test result|FAILED|panicked|^== |reference:|cuda f32:" "$OUT/run.log" | head -80
  ;;
esac
