#!/usr/bin/env python3
"""Cross-check the reference against Hugging Face transformers' MambaForCausalLM.

Run on a machine with PyTorch and transformers (the lent GPU machine has both), from the
repository root, with a release build of vet-train:

    python3 conformance/scripts/hf_crosscheck.py target/release/vet-train [MODEL_DIR...]

For each case it runs `vet-train debug-state` and transformers' (slow, pure PyTorch) path on
the same checkpoint and tokens, and prints the relative error of logits, loss and every
gradient. Cases: the bundled tiny checkpoint written by Vet-Mamba (does our checkpoint load in
transformers and agree?) and random checkpoints written by transformers with biases, untied
heads and other conv widths (do theirs load in Vet-Mamba and agree?). Both in f32 and f64.
Exits non-zero when any relative error exceeds the limit for its precision.
"""
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file
from transformers import MambaConfig, MambaForCausalLM

LIMIT = {torch.float32: 1e-5, torch.float64: 1e-6}  # f64 runs still write f32 outputs
BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/vet-train"
TMP = tempfile.mkdtemp(prefix="hf-crosscheck-")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def ours(model_dir, ids, device):
    tok = os.path.join(TMP, "ids.safetensors")
    out = os.path.join(TMP, "ours.safetensors")
    save_file({"input_ids": ids}, tok)
    subprocess.run([BIN, "debug-state", "--model", model_dir, "--tokens", tok, "--out", out,
                    "--device", device], check=True, stdout=subprocess.DEVNULL)
    return load_file(out)


def theirs(model_dir, ids, dtype):
    model = MambaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {f"grad.{n}": p.grad for n, p in model.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


def check(name, model_dir, ids):
    worst_all = 0.0
    ok = True
    for dtype, device in [(torch.float32, "reference"), (torch.float64, "reference-f64")]:
        o = ours(model_dir, ids, device)
        logits, loss, grads = theirs(model_dir, ids, dtype)
        errs = {"logits": rel(o["logits"], logits), "loss": rel(o["loss"].reshape(()), loss)}
        for k, g in grads.items():
            errs[k] = rel(o[k], g)
        missing = [k for k in o if k.startswith("grad.") and k not in grads]
        worst_key = max(errs, key=errs.get)
        worst = errs[worst_key]
        worst_all = max(worst_all, worst)
        passed = worst <= LIMIT[dtype] and not missing
        ok &= passed
        print(f"{name:<28} {str(dtype)[6:]:<8} logits {errs['logits']:.2e}  loss {errs['loss']:.2e}  "
              f"worst grad {worst:.2e} ({worst_key})  {'ok' if passed else 'FAIL'}"
              + (f"  ours only: {missing}" if missing else ""))
    return ok


def random_checkpoint(name, seed, **kw):
    torch.manual_seed(seed)
    cfg = MambaConfig(**kw)
    model = MambaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = os.path.join(TMP, name)
    model.save_pretrained(d)
    return d


def main():
    ok = True
    tiny = "fixtures/tiny"
    ids = load_file("fixtures/goldens/tiny_inputs.safetensors")["input_ids"]
    ok &= check("vet-mamba tiny (ours -> HF)", tiny, ids)
    cases = [
        ("hf untied+bias (HF -> ours)", 1, dict(vocab_size=97, hidden_size=48, num_hidden_layers=3,
                                                state_size=8, conv_kernel=4, expand=2, time_step_rank=5,
                                                use_bias=True, use_conv_bias=True, tie_word_embeddings=False)),
        ("hf tied conv2 (HF -> ours)", 2, dict(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                               state_size=16, conv_kernel=2, expand=2,
                                               use_bias=False, use_conv_bias=False, tie_word_embeddings=True)),
    ]
    for name, seed, kw in cases:
        d = random_checkpoint(name.split()[1], seed, **kw)
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, kw["vocab_size"], (3, 40), generator=g)
        ok &= check(name, d, ids)
    # Any further checkpoint directories given (e.g. ones vet-train wrote while training).
    for i, d in enumerate(sys.argv[2:]):
        vocab = MambaConfig.from_pretrained(d).vocab_size
        g = torch.Generator().manual_seed(100 + i)
        ids = torch.randint(0, vocab, (2, 48), generator=g)
        ok &= check(f"{os.path.basename(d.rstrip('/'))} (ours -> HF)", d, ids)
    # The bundled tokenizer.json loads in HF tokenizers and is byte-level: ids are the bytes.
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tiny, "tokenizer.json"))
    text = "Rabbits need hay; cats can't eat lilies — ever."
    ids = tok.encode(text).ids
    tok_ok = ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    print(f"tokenizer.json in HF tokenizers: {len(ids)} ids, round trip {'ok' if tok_ok else 'FAIL'}")
    ok &= tok_ok
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
