#!/usr/bin/env bash
# The CPU tier beside llama.cpp, in one run (README, "CPU inference"):
#
#   bash simd/benches/figures.sh [MODELS] [DTYPES]      # defaults: 130m  f32,bf16,int8,int4
#   RUNS=1 bash simd/benches/figures.sh                 # one run of each measurement (default 3)
#   LOG=target/figures/1.4b.log bash simd/benches/figures.sh 1.4b int8,int4   # log elsewhere
#
# For each model shape (130m, 1.4b) a random checkpoint (simd/benches/random_mamba.py), exported
# to GGUF by `vet-train export` (f32, q8_0) and llama-quantize (bf16, q4_0); then, format by
# format, `cargo bench -p simd --bench inference` (2 threads; it measures the memory bandwidth
# in the same run) and `llama-bench -t 2 -p 512 -n 128` on the same weights, minutes apart, and
# one table of ratios. The load average is printed beside the figures: the machine may be
# shared, so the ratios are what counts; the bench's lines on stderr (kept in the log) add
# tokens per CPU-second, which a loaded machine disturbs less. llama.cpp: $LLAMACPP_BIN
# (default /work/tools/llama.cpp/build/bin; scripts/check-llamacpp.sh builds it). A
# -DGGML_NATIVE=ON build on a CPU with AMX died with SIGILL on q8_0 here (AMX not granted in
# this VM): build ggml with -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON
# -DGGML_AVX512_BF16=ON then (the ggml libraries are enough: llama-bench's RUNPATH yields to
# LD_LIBRARY_PATH=/that/build/bin).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODELS=${1:-130m}
DTYPES=${2:-f32,bf16,int8,int4}
BIN=${LLAMACPP_BIN:-/work/tools/llama.cpp/build/bin}
OUT=target/figures
RUNS=${RUNS:-3}
mkdir -p "$OUT"
cargo bench -p simd --bench inference --no-run -q 2>/dev/null
gguf_type() { case $1 in f32) echo f32 ;; bf16) echo bf16 ;; int8) echo q8_0 ;; int4) echo q4_0 ;; esac; }
for m in ${MODELS//,/ }; do
    dir=$OUT/ckpt-$m
    [ -f "$dir/model.safetensors" ] || python3 simd/benches/random_mamba.py "$dir" "$m" >/dev/null
    for g in f32 q8_0; do
        [ -f "$OUT/$m-$g.gguf" ] && continue
        cargo build --release -q -p trainer --bin vet-train
        target/release/vet-train export --model "$dir" --format gguf --out "$OUT/$m-$g.gguf" \
            --dtype "$g" >/dev/null
    done
    for q in bf16:BF16 q4_0:Q4_0; do
        [ -f "$OUT/$m-${q%%:*}.gguf" ] || "$BIN/llama-quantize" "$OUT/$m-f32.gguf" \
            "$OUT/$m-${q%%:*}.gguf" "${q##*:}" >/dev/null 2>&1
    done
done
log=${LOG:-$OUT/figures.log}
: >"$log"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores" | tee -a "$log"
for m in ${MODELS//,/ }; do
    for dt in ${DTYPES//,/ }; do
        g=$(gguf_type "$dt")
        echo "== $m $dt load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"
        cargo bench -q -p simd --bench inference -- --models "$m" --dtypes "$dt" --threads 2 \
            --runs "$RUNS" 2>&1 | tee -a "$log"
        echo "== llama $m $g load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"
        "$BIN/llama-bench" -m "$OUT/$m-$g.gguf" -t 2 -p 512 -n 128 -r "$RUNS" -o md 2>/dev/null \
            | tee -a "$log" || echo "llama-bench failed on $m-$g.gguf" | tee -a "$log"
    done
done
python3 simd/benches/figures_table.py "$log"
