#!/usr/bin/env python3
"""Static instruction counts of one kernel's SASS, without a GPU.

    python3 scripts/ptxas_report.py --ptxas PTXAS --cubin /tmp/k.cubin   # build the cubin
    python3 scripts/sass_count.py /tmp/k.cubin selective_scan_bwd_f32 [--range 26bf0:32be0]

Prints the kernel's instruction count and opcode histogram, its loops (backward branches:
start, end, instructions), and the histogram of `--range START:END` (hex addresses of the
SASS listing, e.g. the body of the scan backward's window between the chunk setup's skip
branch and the loop's back edge). Needs cuobjdump and nvdisasm (PyPI wheels
nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm; pass --cuobjdump, nvdisasm on PATH).
Used for the scan kernels' instruction budget (README "What holds the scan backward").
"""
import argparse
import collections
import re
import subprocess
import sys

INS = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*?);")


def listing(cuobjdump, cubin, kernel):
    out = subprocess.run([cuobjdump, "-sass", "-fun", kernel, cubin], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr)
    ins = []
    for line in out.stdout.splitlines():
        m = INS.match(line)
        if m:
            ins.append((int(m.group(1), 16), m.group(3), m.group(4)))
    if not ins:
        sys.exit(f"no SASS for {kernel} in {cubin}")
    return ins


def hist(ins, top=24):
    c = collections.Counter(op.split(".")[0] for _, op, _ in ins)
    return ", ".join(f"{k} {v}" for k, v in c.most_common(top))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cubin")
    ap.add_argument("kernel")
    ap.add_argument("--range", default=None, help="START:END, hex SASS addresses")
    ap.add_argument("--cuobjdump", default="cuobjdump")
    ap.add_argument("--loops", type=int, default=6, help="largest loops to list")
    a = ap.parse_args()
    ins = listing(a.cuobjdump, a.cubin, a.kernel)
    print(f"{a.kernel}: {len(ins)} instructions")
    print(f"  {hist(ins)}")
    loops = []
    for addr, op, args in ins:
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", args)
            if m and int(m.group(1), 16) < addr:
                t = int(m.group(1), 16)
                loops.append((t, addr, sum(1 for x in ins if t <= x[0] <= addr)))
    for t, e, n in sorted(loops, key=lambda x: -x[2])[: a.loops]:
        print(f"  loop {t:#x}..{e:#x}: {n} instructions")
    if a.range:
        s, e = (int(x, 16) for x in a.range.split(":"))
        body = [x for x in ins if s <= x[0] <= e]
        print(f"range {s:#x}..{e:#x}: {len(body)} instructions")
        print(f"  {hist(body)}")


if __name__ == "__main__":
    main()
