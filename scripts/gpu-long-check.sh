#!/usr/bin/env bash
# Issue 21's check at a size that can learn to copy (README, "Long records"): the `small` preset
# (d_model 512, 8 layers, 15.7 M parameters) trained on long recall files twice, with
# carry_state = "detach" and with plain windows (the same data, tokens, steps and seed), then
# `vet-train eval --long` of both on the held-out files, all targets and the five recall cues.
#
#   [B=folder of vet-train and vet-data] [DEVICE=cuda] [PRESET=small] [STEPS=3000] [BATCH=32]
#   [SEQ=512] [RECORDS=1000] [RECALL_P=0.5] [SEED=1] [RUNS="carry plain"] [EVALS="carried reset"]
#   [RUN_TIMEOUT=seconds a run may take] [OUT=folder for the results]
#   bash scripts/gpu-long-check.sh [WORK_DIR]
#
# On the GPU machine after `bash scripts/gpu-tests.sh` here (carry target/gpu-tests, or a folder B
# holding only its vet-train and vet-data, 18 MB). The data are
# generated there (make_long_records.py, seed 7; 1000 files of 40-120k characters, about 33k
# tokens each), so nothing large travels. Each run's metrics.jsonl and the evaluation's
# long_eval.json and plots are copied to $OUT when it is set. A small smoke test on the CPU:
#   B=target/release DEVICE=cpu PRESET=quickstart STEPS=4 BATCH=4 SEQ=64 RECORDS=40 bash scripts/gpu-long-check.sh /tmp/lc
set -euo pipefail
cd "$(dirname "$0")/.."
B=${B:-target/gpu-tests}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-small}
STEPS=${STEPS:-3000}
BATCH=${BATCH:-32}
SEQ=${SEQ:-512}
RECORDS=${RECORDS:-1000}
RECALL_P=${RECALL_P:-0.5}
work=${1:-runs/long-check}
mkdir -p "$work"

python3 fixtures/scripts/make_long_records.py --kind recall --seed 7 --records "$RECORDS" \
    --min-chars 40000 --max-chars 120000 --recall-p "$RECALL_P" --out "$work/recall.jsonl"
"$B/vet-data" prepare --input "$work/recall.jsonl" --tokenizer fixtures/tokenizer/tokenizer.json \
    --val-fraction 0.05 --seed 1 --out "$work/data" >/dev/null

conf() { # NAME CARRY_LINES
    cat >"$work/$1.toml" <<EOF
stage = "pretrain"
out_dir = "$work/$1"
[model]
preset = "$PRESET"
[data]
manifest = "$work/data/manifest.json"
tokenizer = "fixtures/tokenizer/tokenizer.json"
[train]
batch = $BATCH
seq_len = $SEQ
steps = $STEPS
seed = ${SEED:-1}
$2
[optim]
lr = 2e-3
min_lr = 2e-4
schedule = "cosine"
warmup_steps = 100
precision = "$([ "$DEVICE" = cpu ] && echo f32 || echo bf16)"
[eval]
every = 100000
[checkpoint]
every = $STEPS
keep_last = 1
EOF
}
conf carry $'carry_state = "detach"\ncarry_streams = 8'
conf plain 'carry_state = false'

models=()
for r in ${RUNS:-carry plain}; do
    start=$(date +%s)
    if timeout "${RUN_TIMEOUT:-0}" "$B/vet-train" --config "$work/$r.toml" --device "$DEVICE" >"$work/$r.log" 2>&1; then
        echo "$r: trained in $(($(date +%s) - start)) s; $(python3 - "$work/$r/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if "tokens_per_s" in r]  # tokens_per_s: the run's average so far
last = [r["loss"] for r in steps][-50:]
print(f"{steps[-1]['tokens_per_s']:,.0f} tokens/s over the run, "
      f"mean loss of the last {len(last)} steps {sum(last) / len(last):.4f}")
PY
)"
        models+=(--model "$work/$r/checkpoints/step-$(printf %08d "$STEPS")")
    else
        echo "$r: FAILED"
        tail -5 "$work/$r.log"
    fi
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/$r"
        cp "$work/$r.toml" "$work/$r.log" "$OUT/$r/"
        cp "$work/$r/metrics.jsonl" "$OUT/$r/" 2>/dev/null || true
    fi
done
[ ${#models[@]} -gt 0 ] || exit 1

cues=(--score-after "allergic to" --score-after "transfusion:" --score-after "stays on the"
    --score-after "condition on file:" --score-after "medication continued:")
for mode in ${EVALS:-carried reset}; do
    extra=()
    [ $mode = reset ] && extra=(--reset-windows)
    "$B/vet-train" eval --long "${models[@]}" --data "$work/data" --seq-len "$SEQ" --min-tokens 8192 \
        --max-docs 48 --device "$DEVICE" --out-dir "$work/eval-$mode" \
        --tokenizer fixtures/tokenizer/tokenizer.json "${cues[@]}" "${extra[@]}" >"$work/eval-$mode.log" 2>&1 ||
        { echo "eval ($mode) FAILED"; tail -5 "$work/eval-$mode.log"; exit 1; }
    echo "== eval, windows of $SEQ, state $mode (nats per target: all / recalled values)"
    python3 - "$work/eval-$mode/long_eval.json" <<'PY'
import json, sys
for m in json.load(open(sys.argv[1])):
    print(m["model"])
    for key in ("buckets", "cued"):
        cells = [f"{b['from']}-{b['to']}: {b['loss']:.4f} ({b['tokens']})" for b in m.get(key, [])]
        print(f"  {key}: " + " | ".join(cells))
PY
    if [ -n "${OUT:-}" ]; then cp -r "$work/eval-$mode" "$OUT/"; fi
done
