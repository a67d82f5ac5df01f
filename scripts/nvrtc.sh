#!/usr/bin/env bash
# NVRTC without a GPU: fetch libnvrtc (the PyPI wheel `nvidia-cuda-nvrtc`, the same 13.0 release
# as the GPU machine's toolkit) into target/nvrtc and compile every kernel build for sm_90.
# A kernel that does not compile fails here in seconds instead of on the device.
#
#   bash scripts/nvrtc.sh          # fetch (once) and run gpu/tests/gpu_nvrtc_compile.rs
#   bash scripts/nvrtc.sh --path   # fetch (once) and print the folder to put on LD_LIBRARY_PATH
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/nvrtc
lib="$dir/nvidia/cu13/lib"
if [ ! -e "$lib/libnvrtc.so.13" ]; then
    mkdir -p "$dir"
    python3 -m pip download --quiet --no-deps 'nvidia-cuda-nvrtc==13.0.88' -d "$dir/wheel"
    python3 -m zipfile -e "$dir"/wheel/nvidia_cuda_nvrtc-*.whl "$dir"
    rm -rf "$dir/wheel"
fi
if [ "${1:-}" = "--path" ]; then
    echo "$PWD/$lib"
    exit 0
fi
LD_LIBRARY_PATH="$PWD/$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" VET_REQUIRE_NVRTC=1 \
    cargo test ${CARGO_PROFILE_ARGS:-} -p gpu --test gpu_nvrtc_compile
