#!/usr/bin/env python3
"""A random quickstart-sized Mamba checkpoint (d_model 64, 2 layers, the bundled 4096-token BPE
tokenizer) for scripts/check-llamacpp.sh when no trained quickstart checkpoint is at hand:
config.json, model.safetensors (f32) and tokenizer.json, written with numpy only.

    python3 scripts/random_checkpoint.py OUT_DIR [SEED]

Weights are drawn wider than a real init (so greedy choices are not near-ties), A_log = ln(n+1)
and a positive dt bias as Mamba's init has them.
"""
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

out = Path(sys.argv[1])
rng = np.random.default_rng(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
d_model, n_layer, vocab, d_state, d_conv = 64, 2, 4096, 16, 4
d_inner, dt_rank = 2 * d_model, 4
cfg = {
    "architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": d_model,
    "num_hidden_layers": n_layer, "vocab_size": vocab, "state_size": d_state,
    "conv_kernel": d_conv, "expand": 2, "intermediate_size": d_inner,
    "time_step_rank": dt_rank, "layer_norm_epsilon": 1e-5, "use_bias": False,
    "use_conv_bias": True, "residual_in_fp32": True, "tie_word_embeddings": True,
    "pad_vocab_size_multiple": 8, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1,
}


def w(*shape, scale=0.5):
    return (rng.standard_normal(shape) * scale / np.sqrt(shape[-1])).astype(np.float32)


t = {"backbone.embeddings.weight": w(vocab, d_model, scale=8.0)}
for i in range(n_layer):
    m = f"backbone.layers.{i}.mixer"
    t[f"backbone.layers.{i}.norm.weight"] = (1 + 0.1 * rng.standard_normal(d_model)).astype(np.float32)
    t[f"{m}.in_proj.weight"] = w(2 * d_inner, d_model, scale=1.0)
    t[f"{m}.conv1d.weight"] = w(d_inner, 1, d_conv, scale=1.0)
    t[f"{m}.conv1d.bias"] = w(d_inner, scale=0.1)
    t[f"{m}.x_proj.weight"] = w(dt_rank + 2 * d_state, d_inner, scale=1.0)
    t[f"{m}.dt_proj.weight"] = w(d_inner, dt_rank, scale=1.0)
    t[f"{m}.dt_proj.bias"] = rng.uniform(-4.0, -2.0, d_inner).astype(np.float32)
    t[f"{m}.A_log"] = np.log(np.tile(np.arange(1, d_state + 1, dtype=np.float32), (d_inner, 1)))
    t[f"{m}.D"] = np.ones(d_inner, dtype=np.float32)
    t[f"{m}.out_proj.weight"] = w(d_model, d_inner, scale=1.0)
t["backbone.norm_f.weight"] = np.ones(d_model, dtype=np.float32)

header, blobs, off = {}, [], 0
for name, a in t.items():
    b = a.astype("<f4").tobytes()
    header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
    blobs.append(b)
    off += len(b)
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
out.mkdir(parents=True, exist_ok=True)
(out / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
(out / "config.json").write_text(json.dumps(cfg, indent=2))
shutil.copy(Path(__file__).parent.parent / "fixtures/tokenizer/tokenizer.json", out / "tokenizer.json")
print(out)
