#!/usr/bin/env python3
"""A random Mamba checkpoint of a real model's shape (HF names, f32, tied embeddings, the bundled
BPE tokenizer padded to the vocabulary by the GGUF export), for the llama.cpp side of
simd/benches/figures.sh. Written with numpy only, tensor by tensor.

    python3 simd/benches/random_mamba.py OUT_DIR {130m|1.4b}
"""
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

out, size = Path(sys.argv[1]), sys.argv[2]
d_model, n_layer = {"130m": (768, 24), "1.4b": (2048, 48)}[size]
vocab, d_state, d_conv = 50280, 16, 4
d_inner, dt_rank = 2 * d_model, -(-d_model // 16)
rng = np.random.default_rng(1)
cfg = {
    "architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": d_model,
    "num_hidden_layers": n_layer, "vocab_size": vocab, "state_size": d_state,
    "conv_kernel": d_conv, "expand": 2, "intermediate_size": d_inner,
    "time_step_rank": dt_rank, "layer_norm_epsilon": 1e-5, "use_bias": False,
    "use_conv_bias": True, "residual_in_fp32": True, "tie_word_embeddings": True,
    "pad_vocab_size_multiple": 8, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1,
}


def w(*shape, scale=1.0):
    return (rng.standard_normal(shape, dtype=np.float32) * (scale / np.sqrt(shape[-1]))).astype(np.float32)


shapes = {"backbone.embeddings.weight": (vocab, d_model)}
for i in range(n_layer):
    m = f"backbone.layers.{i}.mixer"
    shapes[f"backbone.layers.{i}.norm.weight"] = (d_model,)
    shapes[f"{m}.in_proj.weight"] = (2 * d_inner, d_model)
    shapes[f"{m}.conv1d.weight"] = (d_inner, 1, d_conv)
    shapes[f"{m}.conv1d.bias"] = (d_inner,)
    shapes[f"{m}.x_proj.weight"] = (dt_rank + 2 * d_state, d_inner)
    shapes[f"{m}.dt_proj.weight"] = (d_inner, dt_rank)
    shapes[f"{m}.dt_proj.bias"] = (d_inner,)
    shapes[f"{m}.A_log"] = (d_inner, d_state)
    shapes[f"{m}.D"] = (d_inner,)
    shapes[f"{m}.out_proj.weight"] = (d_model, d_inner)
shapes["backbone.norm_f.weight"] = (d_model,)


def value(name, shape):
    if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith(".D"):
        return np.ones(shape, dtype=np.float32)
    if name.endswith("A_log"):
        return np.log(np.tile(np.arange(1, d_state + 1, dtype=np.float32), (d_inner, 1)))
    if name.endswith("dt_proj.bias"):
        return rng.uniform(-4.0, -2.0, shape).astype(np.float32)
    if name.endswith("conv1d.bias"):
        return w(*shape, scale=0.1)
    return w(*shape, scale=0.5 if "embeddings" in name else 1.0)


header, off = {}, 0
for name, shape in shapes.items():
    n = 4 * int(np.prod(shape))
    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + n]}
    off += n
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
out.mkdir(parents=True, exist_ok=True)
with open(out / "model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for name, shape in shapes.items():
        f.write(value(name, shape).astype("<f4").tobytes())
(out / "config.json").write_text(json.dumps(cfg, indent=2))
shutil.copy(Path(__file__).parent.parent.parent / "fixtures/tokenizer/tokenizer.json", out / "tokenizer.json")
print(out)
