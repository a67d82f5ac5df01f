#!/usr/bin/env bash
# The CUDA tier's tests and benchmark.
#
#   bash scripts/gpu-tests.sh            # here (no GPU needed): build the GPU test binaries and
#                                        # gpu-bench into target/gpu-tests/ (stripped)
#   bash scripts/gpu-tests.sh run        # on the GPU machine: run every GPU test binary
#   bash scripts/gpu-tests.sh bench [train|scan|infer|all]   # on the GPU machine: the benchmark
#
# target/gpu-tests/ also holds vet-train, vet-data and vet-chat (scripts/gpu-dist-check.sh uses them), e.g. for the whole quickstart on the GPU:
# `target/gpu-tests/vet-train --device cuda --out-dir runs/quickstart-cuda`.
#
# With the device tool: build here, then run with `carry: ["target/gpu-tests"]` and the command
# `bash scripts/gpu-tests.sh run`. Without a CUDA device every GPU test prints a `skipping`
# line and passes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-tests

case "${1:-build}" in
build)
    mkdir -p "$out"
    find "$out" -maxdepth 1 -type f -delete
    cargo test --release -p gpu -p conformance -p trainer --no-run --message-format=json 2>/dev/null \
        | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = m["target"]["name"]
        # The per-op conformance test files hold the GPU test of their op beside the others.
        # gpu_nvrtc_compile needs no GPU: CI runs it (scripts/nvrtc.sh).
        if name == "gpu_nvrtc_compile":
            continue
        if name == "gpu" or name.startswith("gpu_") or name in ("selective_scan", "conv1d", "norm", "loss", "decode", "carry_windows"):
            print(m["executable"])
' | while read -r exe; do
        cp "$exe" "$out/$(basename "$exe" | sed 's/-[0-9a-f]*$//')"
    done
    cargo build --release -p gpu --bin gpu-bench -p trainer --bin vet-chat --bin vet-train --bin vet-data
    cp target/release/gpu-bench target/release/vet-chat target/release/vet-train target/release/vet-data "$out/"
    strip "$out"/* 2>/dev/null || true
    for f in gpu-bench vet-chat gpu_conformance selective_scan conv1d norm loss gpu_kernel_cache gpu_chat; do
        [ -x "$out/$f" ] || { echo "gpu-tests.sh: $out/$f was not built" >&2; exit 1; }
    done
    ls -la "$out"
    ;;
run)
    status=0
    for t in "$out"/*; do
        [ -f "$t" ] || continue # other builds kept beside this one for comparison
        case "$(basename "$t")" in gpu-bench | vet-chat | vet-train | vet-data) continue ;; esac
        echo "== $t"
        "$t" --test-threads=1 --nocapture || status=1
    done
    # vet-chat's command line on the GPU: greedy ids equal to the reference's (f32).
    echo "== vet-chat --device cuda"
    ids=1,2,3,40,41,42
    want=$("$out/vet-chat" --model fixtures/tiny --device reference --tokens "$ids" --greedy --max-new-tokens 24)
    got=$("$out/vet-chat" --model fixtures/tiny --device cuda --precision f32 --tokens "$ids" --greedy --max-new-tokens 24)
    echo "reference: $want"
    echo "cuda f32:  $got"
    if [ -z "$got" ] || [ "$got" != "$want" ]; then
        echo "vet-chat --device cuda: FAILED (ids differ from the reference)"
        status=1
    fi
    exit $status
    ;;
bench)
    "$out/gpu-bench" "${2:-all}"
    ;;
*)
    echo "usage: bash scripts/gpu-tests.sh [build|run|bench [train|scan|infer|all]]" >&2
    exit 2
    ;;
esac
