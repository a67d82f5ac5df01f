#!/usr/bin/env python3
"""Mamba-1 on a GGUF file in numpy, with llama.cpp's CPU arithmetic for quantised matrices:
the evidence for what parts llama.cpp's q8_0 greedy ids from vet-chat's (check-llamacpp.sh).

    llamacpp_q8_emulate.py FILE.gguf PROMPT_IDS FORCED_IDS OUT.f32 [--exact-activations]

Runs the model token by token on PROMPT_IDS then FORCED_IDS[:-1] (teacher forcing) and writes
the logits of the N = len(FORCED_IDS) decode steps (N x n_vocab f32), the layout of
llamacpp_greedy's LOGITS.f32. A matrix product with a Q8_0 weight quantises the activation
vector to Q8_0 first, as ggml's CPU backend does (vec_dot_type Q8_0; x86's quantize_row_q8_0:
scale max|x| / 127 stored as f16, q = round-half-even(x * 127 / max|x|)), then sums per block
d_w * d_x * sum(q_w * q_x); with an F16 weight the activations are rounded to f16 (vec_dot_type
F16). --exact-activations keeps the activations f32: the weights are still the file's, so this
is what vet-chat computes on the dequantised weights.
"""
import sys

import numpy as np
from gguf import GGUFReader

QK = 32


def load(path):
    r = GGUFReader(path)
    kv = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("tokenizer.")}
    mats = {}
    for t in r.tensors:
        typ = t.tensor_type.name
        shape = [int(x) for x in reversed(t.shape)]
        if typ == "Q8_0":
            blk = np.asarray(t.data).reshape(-1, 2 + QK)
            d = blk[:, :2].copy().view(np.float16).astype(np.float32).reshape(shape[0], -1)
            q = blk[:, 2:].copy().view(np.int8).astype(np.int32).reshape(shape[0], -1, QK)
            mats[t.name] = ("Q8_0", d, q)
        else:
            mats[t.name] = (typ, np.asarray(t.data).astype(np.float32).reshape(shape))
    return kv, mats


def quantize_q8(x):
    xb = x.astype(np.float32).reshape(-1, QK)
    amax = np.abs(xb).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore"):
        idv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * idv[:, None]).astype(np.int32)  # rint: round half to even
    return d, q


def matvec(m, x, exact):
    if m[0] == "Q8_0":
        _, dw, qw = m
        if exact:
            return (qw * dw[:, :, None]).reshape(dw.shape[0], -1).astype(np.float32) @ x
        dx, qx = quantize_q8(x)
        sumi = np.einsum("rbk,bk->rb", qw, qx).astype(np.float32)
        return (sumi * (dw * dx[None, :])).sum(axis=1, dtype=np.float32)
    w = m[1]
    if m[0] == "F16" and not exact:
        x = x.astype(np.float16).astype(np.float32)
    return (w @ x).astype(np.float32)


def rmsnorm(x, w, eps):
    return (x / np.sqrt(np.mean(x * x) + eps) * w).astype(np.float32)


def silu(x):
    return x / (1 + np.exp(-x))


def run(path, prompt, forced, exact):
    kv, m = load(path)
    n_layer, d_conv = int(kv["mamba.block_count"]), int(kv["mamba.ssm.conv_kernel"])
    d_inner, d_state = int(kv["mamba.ssm.inner_size"]), int(kv["mamba.ssm.state_size"])
    r, eps = int(kv["mamba.ssm.time_step_rank"]), float(kv["mamba.attention.layer_norm_rms_epsilon"])
    emb = m["token_embd.weight"]
    head = m.get("output.weight", emb)
    conv = [np.zeros((d_inner, d_conv - 1), np.float32) for _ in range(n_layer)]
    ssm = [np.zeros((d_inner, d_state), np.float32) for _ in range(n_layer)]
    seq = prompt + forced[:-1]
    out = []
    for pos, tok in enumerate(seq):
        if emb[0] == "Q8_0":
            x = (emb[2][tok] * emb[1][tok][:, None]).reshape(-1).astype(np.float32)
        else:
            x = emb[1][tok].copy()
        for i in range(n_layer):
            b = f"blk.{i}."
            h = rmsnorm(x, m[b + "attn_norm.weight"][1], eps)
            xz = matvec(m[b + "ssm_in.weight"], h, exact)
            xi, z = xz[:d_inner], xz[d_inner:]
            win = np.concatenate([conv[i], xi[:, None]], axis=1)
            conv[i] = win[:, 1:]
            xc = silu((win * m[b + "ssm_conv1d.weight"][1]).sum(axis=1) + m[b + "ssm_conv1d.bias"][1])
            xd = matvec(m[b + "ssm_x.weight"], xc.astype(np.float32), exact)
            dt = matvec(m[b + "ssm_dt.weight"], xd[:r], exact) + m[b + "ssm_dt.bias"][1]
            dt = np.where(dt <= 20, np.log1p(np.exp(dt)), dt).astype(np.float32)
            B, C = xd[r:r + d_state], xd[r + d_state:]
            ssm[i] = ssm[i] * np.exp(dt[:, None] * m[b + "ssm_a"][1]) + (dt * xc)[:, None] * B[None, :]
            y = ssm[i] @ C + m[b + "ssm_d"][1] * xc
            y = (y * silu(z)).astype(np.float32)
            x = x + matvec(m[b + "ssm_out.weight"], y, exact)
        if pos >= len(prompt) - 1:
            hf = rmsnorm(x, m["output_norm.weight"][1], eps)
            out.append(matvec(head, hf, exact))
    return np.stack(out).astype("<f4")


if __name__ == "__main__":
    a = [s for s in sys.argv[1:] if not s.startswith("--")]
    if len(a) != 4:
        raise SystemExit(__doc__)
    ids = lambda s: [int(t) for t in s.split(",")]
    run(a[0], ids(a[1]), ids(a[2]), "--exact-activations" in sys.argv).tofile(a[3])
