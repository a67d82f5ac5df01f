#!/usr/bin/env bash
# Release binaries for x86-64 Linux that run on glibc 2.17 and later (CentOS 7, Debian 8,
# Ubuntu 14.04 onwards), built with cargo-zigbuild and the Zig toolchain from PyPI (`ziglang`),
# then checked:
#   1. the highest GLIBC_ symbol version any binary needs (objdump -T) is at most 2.17;
#   2. `vet-chat --tokens ... --greedy` on fixtures/tiny gives the same ids as the normal build.
# Output: dist/vet-mamba-VERSION-x86_64-linux-glibc2.17/ (+ .tar.gz), binaries without debug info;
# the checks run on those packaged binaries. The zig build has its own target folder
# (ZIG_TARGET_DIR, default target/zig), so it never disturbs the normal build's.
#
#   bash scripts/release.sh          # build + check (opt-in; not run by CI, see README)
#   bash scripts/release.sh check    # only the checks, on binaries already built
set -euo pipefail
cd "$(dirname "$0")/.."

GLIBC=2.17
TRIPLE=x86_64-unknown-linux-gnu
export PATH="$HOME/.local/bin:$PATH"
# Its own target folder: the zig-built artifacts never mix with the normal build's.
ZIG_TARGET=${ZIG_TARGET_DIR:-target/zig}
NORMAL_TARGET=${CARGO_TARGET_DIR:-target}

# vet-serve joins the release once its crate exists.
BINS=(vet-chat vet-train vet-data)
PKGS=(-p trainer)
if [ -f serve/Cargo.toml ]; then
    BINS+=(vet-serve)
    PKGS+=(-p serve)
fi

need_tools() {
    if ! python3 -c 'import ziglang' 2>/dev/null || ! command -v cargo-zigbuild >/dev/null; then
        pip install --user --quiet ziglang cargo-zigbuild
    fi
    command -v objdump >/dev/null && command -v strip >/dev/null \
        || { apt-get update && apt-get install -y binutils; }
}

build() {
    local t0=$SECONDS
    CARGO_TARGET_DIR=$ZIG_TARGET cargo zigbuild --release --target "$TRIPLE.$GLIBC" "${PKGS[@]}" --bins
    echo "release.sh: zigbuild took $((SECONDS - t0)) s"
}

# The highest GLIBC_x.y a binary's dynamic symbols ask for.
max_glibc() {
    objdump -T "$1" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1
}

check() { # the packaged binaries' folder
    local dir=$1 bad=0
    for b in "${BINS[@]}"; do
        local v
        v=$(max_glibc "$dir/$b")
        echo "release.sh: $b needs GLIBC_$v at most"
        if ! "$dir/$b" --version; then
            echo "release.sh: $b --version failed" >&2
            bad=1
        fi
        if [ "$(printf '%s\n%s\n' "$v" "$GLIBC" | sort -V | tail -1)" != "$GLIBC" ]; then
            echo "release.sh: $b needs glibc $v > $GLIBC" >&2
            bad=1
        fi
    done
    # Greedy ids of the old-glibc build against the normal build's, on the bundled model.
    CARGO_TARGET_DIR=$NORMAL_TARGET cargo build --release -p trainer --bin vet-chat
    local ids=72,101,108,108,111,44,32,99,97,116
    local want got
    want=$("$NORMAL_TARGET/release/vet-chat" --model fixtures/tiny --tokens $ids --greedy --max-new-tokens 32)
    got=$("$dir/vet-chat" --model fixtures/tiny --tokens $ids --greedy --max-new-tokens 32)
    if [ "$want" != "$got" ]; then
        echo "release.sh: greedy ids differ: normal build $want, glibc $GLIBC build $got" >&2
        bad=1
    else
        echo "release.sh: greedy ids equal the normal build's ($got)"
    fi
    return $bad
}

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
NAME=vet-mamba-$VERSION-x86_64-linux-glibc$GLIBC

# Copies the binaries into dist/NAME without their debug info (the release profile keeps line
# tables: 80 MB a binary, 10 MB stripped; symbols stay, so backtraces still name functions).
stage() {
    rm -rf "dist/$NAME" "dist/$NAME.tar.gz"
    mkdir -p "dist/$NAME"
    for b in "${BINS[@]}"; do
        cp "$ZIG_TARGET/$TRIPLE/release/$b" "dist/$NAME/"
        strip --strip-debug "dist/$NAME/$b"
    done
    cp README.md "dist/$NAME/"
}

t_start=$SECONDS
need_tools
if [ "${1:-}" != check ]; then build; fi
stage
check "dist/$NAME"
tar -C dist -czf "dist/$NAME.tar.gz" "$NAME"
echo "release.sh: dist/$NAME.tar.gz ($(du -m "dist/$NAME.tar.gz" | cut -f1) MB), $((SECONDS - t_start)) s in all"
