#!/usr/bin/env python3
"""Helpers of scripts/check-llamacpp.sh (numpy and llama.cpp's `gguf` package only).

    llamacpp_compare.py dequant CHECKPOINT FILE.gguf OUT_DIR
        A copy of CHECKPOINT whose weights are the GGUF file's, read back and dequantised
        (Q8_0 = f16 scale x int8, exact in f32; F16 widened). vet-chat on it multiplies by the
        very weights llama.cpp multiplies by, so what is left between the two is arithmetic.
    llamacpp_compare.py tokens PROMPT_IDS FORCED_IDS OUT.safetensors
        input_ids [1, P + N - 1] = prompt + forced[:-1] for `vet-train debug-state`: its logits
        at positions P-1 .. P+N-2 are the N decode steps' logits under teacher forcing.
    llamacpp_compare.py logits OURS.safetensors THEIRS.f32 PROMPT_LEN TOL [PARTS_AT]
        Sets vet-train debug-state's logits against llamacpp_greedy's (same forced tokens),
        step by step: normalised error |theirs - ours|_2 / |ours|_2, the largest |difference|,
        argmax agreement, and our top-2 margin where the argmaxes part. Exits 1 when any
        step's normalised error exceeds TOL, or when the free-running greedy ids part at step
        PARTS_AT although our top-2 margin there is wider than a TOL-sized error can bridge
        (sqrt(2) TOL |ours|_2). Prints one summary line.
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
    if parts[0] == "blk" and parts[3] == "weight":
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


def cmd_logits(ours_path, theirs_path, prompt_len, tol, parts_at):
    ours = read_safetensors(ours_path)["logits"]
    ours = ours.reshape(-1, ours.shape[-1])[prompt_len - 1:]
    theirs = np.fromfile(theirs_path, dtype="<f4").reshape(-1, ours.shape[-1])
    if theirs.shape != ours.shape:
        raise SystemExit(f"logits: ours {ours.shape}, llama.cpp {theirs.shape}")
    if not (np.isfinite(ours).all() and np.isfinite(theirs).all()):
        print("logits: NaN or inf")
        sys.exit(1)
    diff = theirs.astype(np.float64) - ours
    err = np.linalg.norm(diff, axis=1) / np.linalg.norm(ours.astype(np.float64), axis=1)
    top2 = np.sort(ours, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    # argmax with ties to the lowest id on both sides
    a, b = ours.argmax(axis=1), theirs.argmax(axis=1)
    parted = np.nonzero(a != b)[0]
    flips = ", ".join(f"step {i} margin {margin[i]:.2e} |d|max {np.abs(diff[i]).max():.2e}"
                      for i in parted)
    print(f"{len(err)} steps, normalised error max {err.max():.2e} mean {err.mean():.2e}, "
          f"|d|max {np.abs(diff).max():.2e}, smallest top-2 margin {margin.min():.2e}, "
          f"argmax equal {len(err) - len(parted)}/{len(err)}" + (f" (parted: {flips})" if flips else ""))
    bad = err.max() > tol
    if bad:
        print(f"logits: normalised error {err.max():.2e} above the tolerance {tol:.0e}")
    if parts_at < len(err):
        reach = np.sqrt(2) * tol * np.linalg.norm(ours[parts_at].astype(np.float64))
        near = margin[parts_at] <= reach
        print(f"logits: greedy parts at step {parts_at}, top-2 margin {margin[parts_at]:.2e} "
              + ("within" if near else "OUTSIDE") + f" the tolerance's reach {reach:.2e}")
        bad = bad or not near
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
        parts_at = int(args[4]) if len(args) > 4 else 1 << 30
        cmd_logits(args[0], args[1], int(args[2]), float(args[3]), parts_at)
    elif cmd == "bytes":
        cmd_bytes(*args)
    else:
        raise SystemExit(__doc__)
