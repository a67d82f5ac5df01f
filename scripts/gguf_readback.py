#!/usr/bin/env python3
"""Reads a `vet-train export --format gguf` file back with llama.cpp's `gguf` package (PyPI)
and checks it against the checkpoint it came from: every metadata key llama.cpp's Mamba
loader reads, the tokenizer (tokens, types, merges, special ids), and every tensor's name,
type, shape and values.

    python3 scripts/gguf_readback.py CHECKPOINT_DIR FILE.gguf f32|f16|q8_0

Values: F32 tensors equal the checkpoint's bit for bit (`ssm_a` equals -exp(A_log) within
1 ulp-ish, 1e-6 relative); F16 ones equal numpy's float16 rounding; Q8_0 ones are byte for
byte what `gguf.quants.quantize` (llama.cpp's own Python quantizer) makes. Exits 1 naming
every difference.
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, quants

FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}
BIG = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}


def load_safetensors(path):
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        assert meta["dtype"] == "F32", f"{name}: {meta['dtype']} (export checks f32 checkpoints)"
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype="<f4").reshape(meta["shape"])
    return out


def expected_tensors(cfg, st, dtype):
    """name -> (numpy values in row-major shape, ggml type) as llama.cpp's converter writes."""
    big = BIG[dtype]

    def mat(a):
        if big == Q.Q8_0 and a.shape[-1] % 32 != 0:
            return Q.F16  # the converter's fallback for rows that are not whole Q8_0 blocks
        return big

    want = {}
    emb = st["backbone.embeddings.weight"]
    want["token_embd.weight"] = (emb, mat(emb))
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"backbone.layers.{i}", f"blk.{i}"
        m = p + ".mixer"
        want[f"{b}.attn_norm.weight"] = (st[f"{p}.norm.weight"], Q.F32)
        for hf, gg in [("in_proj", "ssm_in"), ("x_proj", "ssm_x"), ("dt_proj", "ssm_dt"), ("out_proj", "ssm_out")]:
            w = st[f"{m}.{hf}.weight"]
            want[f"{b}.{gg}.weight"] = (w, mat(w))
        conv = st[f"{m}.conv1d.weight"]
        want[f"{b}.ssm_conv1d.weight"] = (conv.reshape(conv.shape[0], conv.shape[2]), Q.F32)
        want[f"{b}.ssm_conv1d.bias"] = (st[f"{m}.conv1d.bias"], Q.F32)
        want[f"{b}.ssm_dt.bias"] = (st[f"{m}.dt_proj.bias"], Q.F32)
        want[f"{b}.ssm_a"] = (-np.exp(st[f"{m}.A_log"].astype(np.float64)), Q.F32)
        want[f"{b}.ssm_d"] = (st[f"{m}.D"], Q.F32)
    want["output_norm.weight"] = (st["backbone.norm_f.weight"], Q.F32)
    if "lm_head.weight" in st and not cfg.get("tie_word_embeddings", True):
        w = st["lm_head.weight"]
        want["output.weight"] = (w, mat(w))
    return want


def check_tensor(name, t, values, qtype, errors):
    if t.tensor_type != qtype:
        errors.append(f"{name}: type {t.tensor_type.name}, expected {qtype.name}")
        return
    ggml_shape = [int(d) for d in t.shape]
    if ggml_shape != list(reversed(values.shape)):
        errors.append(f"{name}: ggml shape {ggml_shape}, expected {list(reversed(values.shape))}")
        return
    if qtype == Q.F32:
        got = np.asarray(t.data, dtype=np.float32).reshape(values.shape)
        if name.endswith(".ssm_a"):
            ok = np.allclose(got, values, rtol=1e-6, atol=0)
        else:
            ok = np.array_equal(got.view(np.uint32), values.astype(np.float32).view(np.uint32))
    elif qtype == Q.F16:
        got = np.asarray(t.data, dtype=np.float16).reshape(values.shape)
        ok = np.array_equal(got.view(np.uint16), values.astype(np.float16).view(np.uint16))
    else:
        want = quants.quantize(values.astype(np.float32), qtype)
        ok = np.array_equal(np.asarray(t.data).reshape(-1), want.reshape(-1))
    if not ok:
        errors.append(f"{name}: values differ from the checkpoint's")


def field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def check_metadata(reader, cfg, tok, dtype, errors):
    d_model = cfg["hidden_size"]
    want = {
        "general.architecture": "mamba",
        "general.file_type": FILE_TYPE[dtype],
        "general.quantization_version": 2,
        "mamba.context_length": 1 << 20,
        "mamba.embedding_length": d_model,
        "mamba.feed_forward_length": 0,
        "mamba.attention.head_count": 0,
        "mamba.block_count": cfg["num_hidden_layers"],
        "mamba.ssm.conv_kernel": cfg["conv_kernel"],
        "mamba.ssm.inner_size": cfg["intermediate_size"],
        "mamba.ssm.state_size": cfg["state_size"],
        "mamba.ssm.time_step_rank": cfg["time_step_rank"],
        "mamba.ssm.dt_b_c_rms": False,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.add_bos_token": False,
    }
    for k, v in want.items():
        got = field(reader, k)
        if got != v:
            errors.append(f"metadata {k}: {got!r}, expected {v!r}")
    eps = field(reader, "mamba.attention.layer_norm_rms_epsilon")
    if eps is None or abs(eps - cfg["layer_norm_epsilon"]) > 1e-12:
        errors.append(f"metadata mamba.attention.layer_norm_rms_epsilon: {eps}")

    vocab = {i: t for t, i in tok["model"]["vocab"].items()}
    types = {i: 1 for i in vocab}
    for a in tok.get("added_tokens", []):
        vocab[a["id"]] = a["content"]
        types[a["id"]] = 3 if a.get("special") else 4
    n = cfg["vocab_size"]
    tokens = field(reader, "tokenizer.ggml.tokens")
    want_tokens = [vocab.get(i, f"[PAD{i}]") for i in range(n)]
    if tokens != want_tokens:
        errors.append(f"tokenizer.ggml.tokens: {len(tokens or [])} tokens differ from tokenizer.json's {n}")
    if field(reader, "tokenizer.ggml.token_type") != [types.get(i, 5) for i in range(n)]:
        errors.append("tokenizer.ggml.token_type differs")
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    if field(reader, "tokenizer.ggml.merges") != merges:
        errors.append("tokenizer.ggml.merges differ from tokenizer.json's")
    eot = next((i for i, t in vocab.items() if t == "<|endoftext|>"), None)
    for k in ("bos", "eos"):
        if field(reader, f"tokenizer.ggml.{k}_token_id") != eot:
            errors.append(f"tokenizer.ggml.{k}_token_id is not <|endoftext|> ({eot})")


def main():
    model, path, dtype = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = json.loads((model / "config.json").read_text())
    tok = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    st = load_safetensors(model / "model.safetensors")
    reader = GGUFReader(path)
    errors = []
    check_metadata(reader, cfg, tok, dtype, errors)
    want = expected_tensors(cfg, st, dtype)
    got = {t.name: t for t in reader.tensors}
    for name in sorted(set(got) ^ set(want)):
        errors.append(f"tensor {name}: {'unexpected' if name in got else 'missing'}")
    for name in sorted(set(got) & set(want)):
        check_tensor(name, got[name], *want[name], errors)
    if errors:
        print(f"{path}: {len(errors)} problems", file=sys.stderr)
        for e in errors:
            print("  " + e, file=sys.stderr)
        sys.exit(1)
    print(f"{path}: {len(got)} tensors and {len(reader.fields)} metadata keys match {model} ({dtype})")


if __name__ == "__main__":
    main()
