#!/usr/bin/env bash
# On the GPU machine (after `bash scripts/gpu-tests.sh` here, carrying target/gpu-tests):
# the data-parallel path through NCCL at world size 1 (`vet-train launch`, ZeRO stages 0-3,
# with and without optimizer offload) against the plain one-GPU run, and stateful training
# (carry_state) against plain windows on the 130M. Prints one table per check.
#
#   bash scripts/gpu-dist-check.sh [OUT_DIR] [zero|stage0|130m|all]   (stage0: the plain run and stage 0 only)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${VET_BIN:-target/gpu-tests}
out=${1:-runs/gpu-dist-check}
mkdir -p "$out"
"$B/vet-data" prepare --input fixtures/data/long/records.jsonl \
    --tokenizer fixtures/tokenizer/tokenizer.json --val-fraction 0.2 --seed 1 --out "$out/data" >/dev/null
conf() { # NAME PRESET BATCH SEQ STEPS CARRY [PRECISION]
    sed -e "s#runs/long/data#$out/data#" -e "s/^preset = .*/preset = \"$2\"/" \
        -e "s/^batch = .*/batch = $3/" -e "s/^seq_len = .*/seq_len = $4/" -e "s/^steps = .*/steps = $5/" \
        -e "s/^carry_state = .*/carry_state = $6/" -e "s#^out_dir = .*#out_dir = \"$out/$1\"#" \
        -e "s/^\[optim\]/[optim]\nprecision = \"${7:-f32}\"/" \
        trainer/configs/long-carry.toml > "$out/$1.toml"
}
ds() { # STAGE OFFLOAD
    printf '{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": %s%s}}\n' "$1" \
        "$([ "$2" = 1 ] && echo ', "offload_optimizer": {"device": "cpu"}')" > "$out/ds-$1-$2.json"
}
summary() { grep -E 'steps.*final loss' | tail -1; }
last_model() { find "$1" -name model.safetensors -path '*step*' | sort | tail -1; }
# Stage 0 on a GPU engine keeps the optimizer on the device and sums the gradients there
# through NCCL, and stages 1-2 keep their optimizer chunk there: at world size 1 their
# weights must equal the plain run's bit for bit.
same_weights() { # RUN_A RUN_B
    local a b
    a=$(last_model "$out/$1"); b=$(last_model "$out/$2")
    if [ -n "$a" ] && [ -n "$b" ] && cmp -s "$a" "$b"; then
        echo "final weights of $2 equal $1's bit for bit ($(basename "$(dirname "$a")"))"
    else
        echo "final weights of $2 DIFFER from $1's ($a vs $b)"
    fi
}
what=${2:-all}

if [ "$what" = zero ] || [ "$what" = stage0 ] || [ "$what" = all ]; then
echo "## ZeRO through NCCL at world size 1, quickstart model, 5 x 128, 40 steps"
conf plain quickstart 5 128 40 false
echo "plain one GPU: $("$B/vet-train" --config "$out/plain.toml" --device cuda 2>&1 | summary)"
stages="0 1 2 3"; [ "$what" = stage0 ] && stages=0
for st in $stages; do
    for off in 0 $([ "$what" = stage0 ] || echo 1); do
        ds $st $off
        conf "z$st-$off" quickstart 5 128 40 false
        r=$("$B/vet-train" launch --nproc-per-node 1 -- --config "$out/z$st-$off.toml" --device cuda \
            --deepspeed "$out/ds-$st-$off.json" 2>&1 | tee "$out/z$st-$off.log" | summary || true)
        echo "stage $st offload $off: $r"
    done
done
same_weights plain z0-0
[ "$what" = stage0 ] || { same_weights plain z1-0; same_weights plain z2-0; }
fi

if [ "$what" = 130m ] || [ "$what" = all ]; then
echo "## 130M, 8 x 2048 bf16, 12 steps: plain, ZeRO-0 (optimizer on the device) and ZeRO-2 through NCCL"
conf w130 130m 8 2048 12 false bf16
conf z0130 130m 8 2048 12 false bf16
conf z130 130m 8 2048 12 false bf16
ds 0 0
ds 2 0
echo "plain one GPU: $("$B/vet-train" --config "$out/w130.toml" --device cuda 2>&1 | summary)"
echo "zero-0 world 1: $("$B/vet-train" launch --nproc-per-node 1 -- --config "$out/z0130.toml" --device cuda \
    --deepspeed "$out/ds-0-0.json" 2>&1 | summary || true)"
same_weights w130 z0130
echo "zero-2 world 1: $(timeout 300 "$B/vet-train" launch --nproc-per-node 1 -- --config "$out/z130.toml" --device cuda \
    --deepspeed "$out/ds-2-0.json" 2>&1 | summary || true)"
fi
