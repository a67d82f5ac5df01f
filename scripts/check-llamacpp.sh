#!/usr/bin/env bash
# Opt-in: runs Vet-Mamba's GGUF export in llama.cpp itself and compares greedy tokens.
#
#   bash scripts/check-llamacpp.sh [QUICKSTART_CHECKPOINT]
#
# 1. llama.cpp: reuses /work/tools/llama.cpp/build (or $LLAMACPP), else builds it once from the
#    llama-cpp-python sdist on PyPI (CMake Release, -DGGML_NATIVE=ON, nice -n 10, -j2; targets
#    llama, llama-bench, llama-quantize, llama-tokenize, llama-simple) and leaves it in place.
# 2. Exports fixtures/tiny and a quickstart-sized checkpoint (the argument, else
#    runs/quickstart/finetune/checkpoints/* newest, else a fresh one from `vet-train`'s quickstart
#    when VET_TRAIN_QUICKSTART=1, else scripts/random_checkpoint.py's random one of that shape
#    with the bundled BPE tokenizer) as f32 and q8_0 GGUF.
# 3. For each file and several prompts: llama.cpp's greedy ids (scripts/llamacpp_greedy.c,
#    linked against libllama) against `vet-chat --tokens ... --greedy`, and both sides' logits
#    at every step under teacher forcing (vet-train debug-state; llamacpp_compare.py); for
#    q8_0 also the bytes against llama-quantize's and scripts/llamacpp_q8_emulate.py (what
#    "equal" means for each dtype is written below, at TOL_F32); and llama.cpp's tokenizer
#    (llama-tokenize) against ours on a sentence, for the BPE model.
# Prints one line per comparison and a summary; exits 1 on any difference.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.local/bin:$PATH"
LLAMACPP=${LLAMACPP:-/work/tools/llama.cpp}
BUILD=$LLAMACPP/build
N_NEW=${N_NEW:-32}
OUT=${OUT:-target/llamacpp-check}
BIN=${BIN:-target/release}  # BIN=target/debug uses the debug build
mkdir -p "$OUT"
python3 -c "import gguf, numpy" 2>/dev/null || pip install --user --quiet "gguf==0.19.0" numpy
t_start=$SECONDS

build_llamacpp() {
    if [ -f "$BUILD/bin/libllama.so" ] && [ -x "$BUILD/bin/llama-tokenize" ]; then
        return
    fi
    if [ ! -f "$LLAMACPP/CMakeLists.txt" ]; then
        local tmp
        tmp=$(mktemp -d)
        pip download llama-cpp-python --no-binary llama-cpp-python --no-deps -d "$tmp"
        tar -C "$tmp" -xzf "$tmp"/llama_cpp_python-*.tar.gz
        mkdir -p "$(dirname "$LLAMACPP")"
        mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$LLAMACPP"
        basename "$tmp"/llama_cpp_python-*.tar.gz > "$LLAMACPP/VET_SOURCE"
        rm -rf "$tmp"
    fi
    command -v cmake >/dev/null || pip install --user --quiet cmake ninja
    local t0=$SECONDS
    cmake -S "$LLAMACPP" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF
    nice -n 10 cmake --build "$BUILD" -j2 --target llama llama-bench llama-quantize \
        llama-tokenize llama-simple
    echo "check-llamacpp: built llama.cpp in $((SECONDS - t0)) s"
}

build_helper() {
    local lib
    lib=$(dirname "$(find "$BUILD" -name 'libllama.so' | head -1)")
    cc -O2 -o "$OUT/llamacpp_greedy" scripts/llamacpp_greedy.c \
        -I"$LLAMACPP/include" -I"$LLAMACPP/ggml/include" -L"$lib" -lllama -Wl,-rpath,"$lib"
}

# What "equal" means (README, "GGUF export"). Every comparison runs both sides on the same
# tokens: the prompt, then vet-chat's greedy ids fed back (teacher forcing), and sets the logits
# of each of the N_NEW steps side by side (llamacpp_compare.py logits).
# f32: llama.cpp multiplies f32 by f32 as we do: the greedy ids must be equal, and the logits
#   within TOL_F32 with the same argmax at every step.
# q8_0: llama.cpp's Q8_0 matrix product rounds the *activations* to Q8_0 as well (ggml's
#   vec_dot_type for Q8_0), which Vet-Mamba never does. So: the file's bytes must equal
#   llama-quantize's; vet-chat runs on the very weights the file holds (dequantised,
#   llamacpp_compare.py dequant); llamacpp_q8_emulate.py (numpy, the file's weights) must give
#   vet-train debug-state's logits within TOL_F32 with its activations exact, and llama.cpp's
#   with its activations rounded as ggml rounds them: the same argmax at every step, the
#   median step within TOL_F32 and every step within TOL_Q8 (where an f32 ulp of difference,
#   e.g. ggml's vectorised exp, moves one activation across a rounding boundary, the logits
#   jump for a few steps); vet-chat's logits must be within TOL_Q8 of llama.cpp's. The greedy
#   ids are reported: where they part, llama.cpp took the token that 8-bit activations pick.
TOL_F32=${TOL_F32:-1e-5}
TOL_Q8=${TOL_Q8:-1e-1}
fail=0
pass=0
note() { echo "check-llamacpp: $*"; }
verdict() { if [ "$1" = 0 ]; then pass=$((pass + 1)); else fail=$((fail + 1)); fi; }

first_difference() { # ids-a ids-b -> index of the first difference (= length when equal)
    local a b same=0
    IFS=, read -ra a <<< "$1"
    IFS=, read -ra b <<< "$2"
    while [ $same -lt ${#a[@]} ] && [ "${a[$same]}" = "${b[$same]:-}" ]; do same=$((same + 1)); done
    echo $same
}

logits() { # label a b tol [--argmax]: appends to $report, clears $ok on failure
    local r rc=0
    r=$(python3 scripts/llamacpp_compare.py logits "$2" "$3" "$np" "$N_NEW" "$4" ${5:-}) || rc=$?
    report="$report; $1: $r"
    [ $rc = 0 ] || ok=0
}

compare() { # name dtype gguf checkpoint ids
    local name=$1 dt=$2 gguf=$3 ck=$4 ids=$5 ours theirs same np tf=$OUT/tf ok=1 report=""
    ours=$("$BIN"/vet-chat --model "$ck" --tokens "$ids" --greedy --max-new-tokens "$N_NEW")
    theirs=$("$OUT/llamacpp_greedy" "$gguf" "$N_NEW" "$ids")
    same=$(first_difference "$ours" "$theirs")
    np=$(awk -F, '{print NF}' <<< "$ids")
    "$OUT/llamacpp_greedy" "$gguf" "$N_NEW" "$ids" "$tf-llama.f32" "$ours" > /dev/null
    python3 scripts/llamacpp_compare.py tokens "$ids" "$ours" "$tf-ids.safetensors"
    "$BIN"/vet-train debug-state --model "$ck" --tokens "$tf-ids.safetensors" \
        --out "$tf-ours.safetensors" --device cpu > "$tf-debug-state.log" 2>&1
    if [ "$dt" = f32 ]; then
        [ "$same" = "$N_NEW" ] || ok=0
        logits "vet vs llama.cpp" "$tf-ours.safetensors" "$tf-llama.f32" "$TOL_F32" --argmax
    else
        python3 scripts/llamacpp_q8_emulate.py "$gguf" "$ids" "$ours" "$tf-exact.f32" --exact-activations
        python3 scripts/llamacpp_q8_emulate.py "$gguf" "$ids" "$ours" "$tf-q8.f32"
        logits "vet vs emulation(f32 act.)" "$tf-ours.safetensors" "$tf-exact.f32" "$TOL_F32"
        logits "emulation(q8 act.) vs llama.cpp" "$tf-q8.f32" "$tf-llama.f32" "$TOL_F32" \
            "--argmax --median $TOL_Q8"
        logits "vet vs llama.cpp" "$tf-ours.safetensors" "$tf-llama.f32" "$TOL_Q8"
    fi
    local head="$same of $N_NEW greedy tokens equal"
    [ "$same" = "$N_NEW" ] || head="$head (vet-chat $ours | llama.cpp $theirs)"
    [ $ok = 1 ] || head="FAIL: $head"
    note "$name: $head$report"
    verdict $((1 - ok))
}

check_model() { # label checkpoint prompt-id-lists...
    local label=$1 ck=$2
    shift 2
    for dt in f32 q8_0; do
        local g="$OUT/$label-$dt.gguf" t0=$SECONDS used=$ck
        "$BIN"/vet-train export --model "$ck" --format gguf --out "$g" --dtype "$dt"
        note "export $label $dt took $((SECONDS - t0)) s"
        if [ "$dt" = q8_0 ]; then
            # Our Q8_0 bytes against llama.cpp's own quantiser run on our f32 export.
            "$BUILD/bin/llama-quantize" "$OUT/$label-f32.gguf" "$OUT/$label-lq-q8_0.gguf" Q8_0 \
                > "$OUT/$label-quantize.log" 2>&1
            local rc=0 by
            by=$(python3 scripts/llamacpp_compare.py bytes "$g" "$OUT/$label-lq-q8_0.gguf") || rc=$?
            note "$label q8_0 weights against llama-quantize: ${by//$'\n'/; }"
            verdict $rc
            used=$OUT/$label-q8_0-weights
            python3 scripts/llamacpp_compare.py dequant "$ck" "$g" "$used" > /dev/null
        fi
        local k=0
        for ids in "$@"; do
            k=$((k + 1))
            compare "$label $dt prompt $k" "$dt" "$g" "$used" "$ids"
        done
    done
}

quickstart_checkpoint() {
    if [ -n "${1:-}" ]; then echo "$1"; return; fi
    local newest
    newest=$(ls -d runs/quickstart/finetune/checkpoints/step-* 2>/dev/null | sort | tail -1 || true)
    if [ -z "$newest" ] && [ "${VET_TRAIN_QUICKSTART:-0}" = 1 ]; then
        "$BIN"/vet-train >&2
        newest=$(ls -d runs/quickstart/finetune/checkpoints/step-* | sort | tail -1)
    fi
    if [ -z "$newest" ]; then
        # The quickstart's shape and BPE tokenizer with random weights.
        python3 scripts/random_checkpoint.py "$OUT/random-quickstart" >&2
        newest=$OUT/random-quickstart
    fi
    echo "$newest"
}

build_llamacpp
build_helper
if [ "$BIN" = target/release ]; then
    cargo build --release -p trainer --bin vet-chat --bin vet-train
fi
check_model tiny fixtures/tiny 72,101,108,108,111 84,104,101,32,100,111,103 1,2,3,250,251,256,10
qs=$(quickstart_checkpoint "${1:-}")
if [ -n "$qs" ]; then
    check_model quickstart "$qs" 2,10,3 100,200,300,400,500 17,4000,33,1024,7,7,7
    # llama.cpp's tokenizer on our GGUF metadata against Hugging Face tokenizers on
    # tokenizer.json (the library vet-chat tokenizes with).
    text="How is canine parvovirus spread? Vaccinate puppies at 6-8 weeks, then yearly."
    theirs=$("$BUILD/bin/llama-tokenize" -m "$OUT/quickstart-f32.gguf" -p "$text" --ids \
        --log-disable 2>/dev/null | tail -1 | tr -d '[] ')
    python3 -c 'import tokenizers' 2>/dev/null || pip install --user --quiet tokenizers
    ours=$(python3 -c 'import sys; from tokenizers import Tokenizer as T
print(",".join(map(str, T.from_file(sys.argv[1]).encode(sys.argv[2]).ids)))' "$qs/tokenizer.json" "$text")
    if [ "$ours" = "$theirs" ]; then
        verdict 0
        note "tokenizer: llama.cpp's ids equal tokenizer.json's ($ours)"
    else
        verdict 1
        note "tokenizer: DIFFER: tokenizer.json $ours | llama.cpp $theirs"
    fi
    compare "quickstart f32 tokenized text" f32 "$OUT/quickstart-f32.gguf" "$qs" "$ours"
else
    echo "check-llamacpp: no quickstart checkpoint (pass one, or VET_TRAIN_QUICKSTART=1 to train one)"
fi
echo "check-llamacpp: $pass passed, $fail failed ($((SECONDS - t_start)) s)"
[ $fail -eq 0 ]
