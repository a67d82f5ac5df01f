#!/usr/bin/env python3
"""Registers, spills and shared memory of every kernel, without a GPU.

Compiles gpu/kernels/*.cu the way the engine does (NVRTC, the sources in gpu/src/kernels.rs's
order, the same -D options) and runs ptxas -v for the target architecture on the PTX.

    python3 scripts/ptxas_report.py [--chunk 32] [--d-state-pad 16] [--arch sm_90] [--filter scan_bwd]

Needs libnvrtc (`bash scripts/nvrtc.sh --path` fetches it) and ptxas: the PyPI wheel
`nvidia-cuda-nvcc==13.0.88` holds it (unzip it and pass --ptxas, or put it on PATH).
"""
import argparse
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sources():
    text = open(os.path.join(ROOT, "gpu/src/kernels.rs")).read()
    names = re.findall(r'include_str!\("\.\./kernels/([^"]+)"\)', text)
    return "".join(open(os.path.join(ROOT, "gpu/kernels", n)).read() for n in names)


def scan_window(d_state_pad, chunk):
    return min(max(64 // d_state_pad, 4), 8, chunk)


def nvrtc_ptx(lib, src, opts):
    nv = ctypes.CDLL(lib)
    prog = ctypes.c_void_p()
    if nv.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"kernels.cu", 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nv.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nv.nvrtcGetProgramLog(prog, log)
    if rc:
        sys.exit("NVRTC failed:\n" + log.value.decode())
    nv.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nv.nvrtcGetPTX(prog, ptx)
    return ptx.value.decode()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--d-state-pad", type=int, default=16)
    ap.add_argument("--d-conv", type=int, default=4)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    ap.add_argument("--nvrtc", default=None, help="libnvrtc.so.13 (default: target/nvrtc's)")
    ap.add_argument("--ptxas", default=shutil.which("ptxas") or "ptxas")
    ap.add_argument("--cubin", default=None, help="also write the cubin here (for cuobjdump -sass)")
    a = ap.parse_args()
    lib = a.nvrtc or os.path.join(ROOT, "target/nvrtc/nvidia/cu13/lib/libnvrtc.so.13")
    opts = [
        f"-DD_STATE_PAD={a.d_state_pad}",
        f"-DD_CONV={a.d_conv}",
        f"-DCHUNK={a.chunk}",
        f"-DSUB={scan_window(a.d_state_pad, a.chunk)}",
        "-std=c++17",
        f"--gpu-architecture=compute_{a.arch[3:]}",
    ]
    ptx = nvrtc_ptx(lib, sources(), opts)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        open(p, "w").write(ptx)
        out = subprocess.run([a.ptxas, "-v", f"-arch={a.arch}", p, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        if a.cubin:
            shutil.copy(os.path.join(d, "k.cubin"), a.cubin)
    name = None
    for line in out.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            continue
        if name and a.filter in name and ("registers" in line or "spill" in line):
            print(f"{name:40s} {line.split('info    : ')[-1].strip()}")


if __name__ == "__main__":
    main()
