#!/usr/bin/env python3
"""The tables of simd/benches/figures.sh from its log: ours / llama.cpp per model and format, our
decode against the bandwidth limit, the batched decode totals, and the load averages seen."""
import sys

GGUF = {"f32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}
ours, batches, llama, loads, bw = {}, {}, {}, [], []
section = None
for line in open(sys.argv[1]):
    if line.startswith("== "):
        f = line.split()
        loads.append(float(f[f.index("load") + 1]))
        section = ("llama", f[2], f[3]) if f[1] == "llama" else ("ours", f[1], f[2])
        continue
    if "memory read bandwidth" in line:
        bw.append(float(line.split(":")[1].split()[0]))
    if not line.startswith("| ") or section is None:
        continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if section[0] == "llama":
        for test in ("pp512", "tg128"):
            if test in cells:
                llama.setdefault(section[1:], {})[test] = float(cells[-1].split()[0])
    elif cells[:2] == list(section[1:]):
        if cells[-1].endswith("%"):
            ours[section[1:]] = (float(cells[2]), float(cells[3]), float(cells[5].split()[0]))
        else:
            batches[section[1:]] = [float(c) for c in cells[2:]]

print("\n| model | weights | prefill tok/s, ours / llama.cpp | decode tok/s, ours / llama.cpp "
      "| our decode, % of the measured bandwidth limit |")
print("|---|---|---|---|---|")
for (m, dt), (p, d, pct) in ours.items():
    ll = llama.get((m, GGUF[dt]), {})
    lp, ld = ll.get("pp512", float("nan")), ll.get("tg128", float("nan"))
    print(f"| {m} | {dt} ({GGUF[dt].upper()}) | {p:.1f} / {lp:.1f} ({p / lp:.2f}×) "
          f"| {d:.2f} / {ld:.2f} ({d / ld:.2f}×) | {pct:.0f} % |")
if batches:
    print("\n| model | weights | total decode tok/s, batch 1 / 4 / 8 / 16 | batch 8 ÷ batch 1 |")
    print("|---|---|---|---|")
    for (m, dt), v in batches.items():
        r = v[2] / v[0] if len(v) >= 3 and v[0] else float("nan")
        print(f"| {m} | {dt} | {' / '.join(f'{x:.1f}' for x in v)} | {r:.1f}× |")
print(f"\n1-minute load average during the run: {min(loads):.1f} to {max(loads):.1f}; "
      f"measured read bandwidth (2 threads): {min(bw):.1f} to {max(bw):.1f} GB/s")
