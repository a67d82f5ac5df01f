#!/usr/bin/env python3
"""Helpers of scripts/check-llamacpp.sh (numpy and llama.cpp's `gguf` package only).

    llamacpp_compare.py dequant CHECKPOINT FILE.gguf OUT_DIR
        A copy of CHECKPOINT whose weights are the GGUF file's, read back and dequantised
        (Q8_0 = f16 scale x int8, exact in f32; F16 widened). vet-chat on it multiplies by the
        very weights llama.cpp multiplies by, so what is left between the two is arithmetic.
    llamacpp_compare.py tokens PROMPT_IDS FORCED_IDS OUT.safetensors
        input_ids [1, P + N - 1] = prompt + forced[:-1] for `vet-train debug-state`: its logits
        at positions P-1 .. P+N-2 are the N decode steps' logits under teacher forcing.
    llamacpp_compare.py logits A B PROMPT_LEN STEPS TOL [--argmax] [--median MAX_TOL]
        Sets two runs' logits on the same forced tokens side by side, step by step. A file
        ending in .safetensors is `vet-train debug-state`'s (its positions PROMPT_LEN-1 .. are
        the decode steps), any other is STEPS x n_vocab f32 (llamacpp_greedy, llamacpp_q8_emulate).
        Prints one line: the normalised error |b - a|_2 / |a|_2 (largest and mean over steps),
        the largest |b - a|, how many steps' argmaxes agree, and A's top-2 margin where they
        part. Exits 1 when a step's normalised error exceeds TOL or, with --argmax, when any
        step's argmaxes part. With --median, TOL bounds the median over the steps and MAX_TOL
        every step (8-bit activations jump where an f32 ulp moves a value across a rounding
        boundary, so two faithful implementations agree to f32 precision at most steps only).
    llamacpp_compare.py bytes A.gguf B.gguf
        Every tensor present in both with the same type: byte-for-byte equal? (our Q8_0
        export against llama-quantize's own quantisation of our F32 export). Exits 1 on a
        difference.
"""
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

# GGUF name -> Hugging Face name of the weights a GGUF export may store in a reduced type.
def hf_name(name):
    if name == "token_embd.weight":
        return "backbone.embeddings.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if parts[0] == "blk" and parts[-1] == "weight" and len(parts) == 4:
        mixer = {"ssm_in": "in_proj", "ssm_x": "x_proj", "ssm_dt": "dt_proj", "ssm_out": "out_proj"}
        if parts[2] in mixer:
            return f"backbone.layers.{parts[1]}.mixer.{mixer[parts[2]]}.weight"
    return None


def read_safetensors(path):
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if v["dtype"] not in ("F32", "I64"):
            raise SystemExit(f"{path}: tensor {k} is {v['dtype']}; expected F32 or I64")
        a, b = v["data_offsets"]
        dt = np.float32 if v["dtype"] == "F32" else np.int64
        out[k] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dt).reshape(v["shape"])
    return out


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for k, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        dt = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}[a.dtype]
        header[k] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)


def cmd_dequant(ck, gguf_path, out):
    ck, out = Path(ck), Path(out)
    w = read_safetensors(ck / "model.safetensors")
    replaced = 0
    for t in GGUFReader(gguf_path).tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        if name == "lm_head.weight" and name not in w:
            raise SystemExit(f"{gguf_path}: output.weight but {ck} ties its head")
        v = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(w[name].shape)
        w[name] = v
        replaced += 1
    out.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "tokenizer.json"):
        if (ck / f).exists():
            shutil.copy(ck / f, out / f)
    write_safetensors(out / "model.safetensors", w)
    print(f"dequant: {replaced} matrices from {gguf_path} -> {out}")


def cmd_tokens(prompt, forced, out):
    ids = [int(x) for x in prompt.split(",")] + [int(x) for x in forced.split(",")][:-1]
    write_safetensors(out, {"input_ids": np.array([ids], dtype=np.int64)})


def step_logits(path, prompt_len, steps):
    if str(path).endswith(".safetensors"):
        x = read_safetensors(path)["logits"]
        return x.reshape(-1, x.shape[-1])[prompt_len - 1:]
    return np.fromfile(path, dtype="<f4").reshape(steps, -1)


def cmd_logits(a_path, b_path, prompt_len, steps, tol, need_argmax, max_tol):
    a = step_logits(a_path, prompt_len, steps)
    b = step_logits(b_path, prompt_len, steps)
    if a.shape != b.shape:
        raise SystemExit(f"logits: {a_path} {a.shape} but {b_path} {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        print("NaN or inf in the logits")
        sys.exit(1)
    diff = b.astype(np.float64) - a
    err = np.linalg.norm(diff, axis=1) / np.linalg.norm(a.astype(np.float64), axis=1)
    top2 = np.sort(a, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    parted = np.nonzero(a.argmax(axis=1) != b.argmax(axis=1))[0]
    flips = ", ".join(f"step {i}: margin {margin[i]:.1e}" for i in parted)
    if max_tol is None:
        bad, tols = err.max() > tol, f"tol {tol:.0e}"
    else:
        bad = np.median(err) > tol or err.max() > max_tol
        tols = f"median {np.median(err):.1e}, tol {tol:.0e} median / {max_tol:.0e} max"
    bad = bad or (need_argmax and len(parted) > 0)
    print(f"error max {err.max():.1e} mean {err.mean():.1e} ({tols}), "
          f"|d| max {np.abs(diff).max():.1e}, argmax {len(err) - len(parted)}/{len(err)}"
          + (f" [parted {flips}]" if flips else "") + (" FAIL" if bad else ""))
    sys.exit(1 if bad else 0)


def cmd_bytes(a_path, b_path):
    a = {t.name: t for t in GGUFReader(a_path).tensors}
    same = differ = other = 0
    for t in GGUFReader(b_path).tensors:
        u = a.get(t.name)
        if u is None or u.tensor_type != t.tensor_type:
            other += 1
            continue
        if bytes(u.data.tobytes()) == bytes(t.data.tobytes()):
            same += 1
        else:
            differ += 1
            print(f"bytes: {t.name} ({t.tensor_type.name}) differs")
    print(f"bytes: {same} tensors byte-for-byte equal, {differ} differ, {other} of another type")
    sys.exit(1 if differ or not same else 0)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "dequant":
        cmd_dequant(*args)
    elif cmd == "tokens":
        cmd_tokens(*args)
    elif cmd == "logits":
        opt = args[5:]
        max_tol = float(opt[opt.index("--median") + 1]) if "--median" in opt else None
        cmd_logits(args[0], args[1], int(args[2]), int(args[3]), float(args[4]), "--argmax" in opt,
                   max_tol)
    elif cmd == "bytes":
        cmd_bytes(*args)
    else:
        raise SystemExit(__doc__)
