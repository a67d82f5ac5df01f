#!/usr/bin/env bash
# On the GPU machine (after `bash scripts/gpu-tests.sh` here, carrying target/gpu-tests): training
# throughput of the 130M at 8 x 2048 (bf16) with plain windows, with carry_state = "detach" and
# with carry_state = 2 (back-propagation through two windows), and with ZERO=1 also through the
# ZeRO driver at world size 1 (stage 2, NCCL). Prints the median of the per-step tokens/s in
# metrics.jsonl after 5 warm-up steps (start-up, evaluation and checkpoints excluded).
#
#   [B=folder of vet-train and vet-data] [ZERO=1] [ONLY="plain k2"] bash scripts/gpu-carry-bench.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
B=${B:-target/gpu-tests}
steps=${1:-40}
out=runs/gpu-carry-bench
mkdir -p "$out"
"$B/vet-data" prepare --input fixtures/data/long/records.jsonl \
    --tokenizer fixtures/tokenizer/tokenizer.json --val-fraction 0.2 --seed 1 --out "$out/data" >/dev/null
conf() { # NAME CARRY
    sed -e "s#runs/long/data#$out/data#" -e 's/^preset = .*/preset = "130m"/' \
        -e 's/^batch = .*/batch = 8/' -e 's/^seq_len = .*/seq_len = 2048/' -e "s/^steps = .*/steps = $steps/" \
        -e "s/^carry_state = .*/carry_state = $2/" -e "s#^out_dir = .*#out_dir = \"$out/$1\"#" \
        -e 's/^\[optim\]/[optim]\nprecision = "bf16"/' -e 's/^every = .*/every = 100000/' \
        trainer/configs/long-carry.toml > "$out/$1.toml"
}
median() { python3 -c '
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if "tokens_per_s" in l]
v = [r["tokens_per_s"] for r in rows if r.get("step", 0) > 5]
print(f"{statistics.median(v):,.0f} tokens/s (median of {len(v)} steps)")' "$1"; }
run() { # NAME LABEL: train, then the median (or the log's tail when the run failed)
    if "$B/vet-train" --config "$out/$1.toml" --device cuda >"$out/$1.log" 2>&1; then
        echo "$2 $(median "$out/$1/metrics.jsonl")"
    else
        echo "$2 FAILED:"; tail -5 "$out/$1.log"
    fi
}
conf plain false
conf carry '"detach"'
conf k2 2
for r in ${ONLY:-plain carry k2}; do
    case $r in
        plain) run plain "plain windows:        " ;;
        carry) run carry "carry_state detach:   " ;;
        k2) run k2 "carry_state 2:        " ;;
        *) echo "ONLY: unknown run $r (plain, carry, k2)"; exit 2 ;;
    esac
done
if [ "${ZERO:-0}" = 1 ]; then
    echo '{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}' > "$out/ds.json"
    conf zero2 false
    "$B/vet-train" launch --nproc-per-node 1 -- --config "$out/zero2.toml" --device cuda \
        --deepspeed "$out/ds.json" >/dev/null 2>&1
    echo "ZeRO-2, NCCL, world 1: $(median "$out/zero2/metrics.jsonl")"
fi
