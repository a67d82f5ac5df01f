//! `vet-train export --format gguf`: a checkpoint as a GGUF file in llama.cpp's `mamba`
//! architecture, so llama.cpp, ollama and LM Studio run it.
//!
//! The layout is what llama.cpp's own converter (`convert_hf_to_gguf.py`, `MambaModel`) writes
//! for a `MambaForCausalLM`, checked against the llama.cpp vendored in llama-cpp-python 0.3.36
//! (ggml 0.25.3):
//!
//! | Hugging Face | GGUF | stored |
//! |---|---|---|
//! | `backbone.embeddings.weight` `[vocab, d_model]` | `token_embd.weight` | dtype |
//! | `layers.i.norm.weight` | `blk.i.attn_norm.weight` | F32 |
//! | `mixer.in_proj.weight` `[2 d_inner, d_model]` | `blk.i.ssm_in.weight` | dtype |
//! | `mixer.conv1d.weight` `[d_inner, 1, d_conv]` | `blk.i.ssm_conv1d.weight` `[d_inner, d_conv]` | F32 |
//! | `mixer.conv1d.bias` | `blk.i.ssm_conv1d.bias` | F32 |
//! | `mixer.x_proj.weight` | `blk.i.ssm_x.weight` | dtype |
//! | `mixer.dt_proj.weight`, `.bias` | `blk.i.ssm_dt.weight`, `.bias` | dtype, F32 |
//! | `mixer.A_log` `[d_inner, d_state]` | `blk.i.ssm_a` = `-exp(A_log)` | F32 |
//! | `mixer.D` | `blk.i.ssm_d` | F32 |
//! | `mixer.out_proj.weight` | `blk.i.ssm_out.weight` | dtype |
//! | `backbone.norm_f.weight` | `output_norm.weight` | F32 |
//! | `lm_head.weight` (untied only; llama.cpp reuses `token_embd` otherwise) | `output.weight` | dtype |
//!
//! As in the converter, a Q8_0 export stores a matrix whose rows are not a multiple of 32 as
//! F16 (`ssm_dt.weight` when `dt_rank` is small). llama.cpp's Mamba graph is RMSNorm, expand 2,
//! a conv bias and no projection biases: other checkpoints are refused, naming the field.

pub mod gguf;
pub mod vocab;

use std::borrow::Cow;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{bail, Context, Result};
use reference::config::{MambaConfig, NormKind};
use reference::params::Params;

use gguf::{GgmlType, GgufFile, TensorEntry, Value};

/// `--dtype` of the export: the type of the big matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    F16,
    Q8_0,
}

impl std::str::FromStr for ExportDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(ExportDtype::F32),
            "f16" => Ok(ExportDtype::F16),
            "q8_0" => Ok(ExportDtype::Q8_0),
            _ => Err(format!("--dtype {s:?}: expected f32, f16 or q8_0")),
        }
    }
}

impl ExportDtype {
    /// `general.file_type` (`llama_ftype`: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0).
    fn file_type(self) -> u32 {
        match self {
            ExportDtype::F32 => 0,
            ExportDtype::F16 => 1,
            ExportDtype::Q8_0 => 7,
        }
    }
}

/// What an export wrote.
#[derive(Debug)]
pub struct ExportSummary {
    pub tensors: usize,
    pub bytes: u64,
    pub vocab: usize,
}

/// Refuses configs llama.cpp's `mamba` architecture cannot run.
pub fn check_supported(cfg: &MambaConfig) -> Result<()> {
    let mut why = Vec::new();
    if cfg.norm != NormKind::Rms {
        why.push("LayerNorm (llama.cpp's Mamba uses RMSNorm only)".to_string());
    }
    if cfg.d_inner != 2 * cfg.d_model {
        why.push(format!(
            "d_inner {} is not 2 × d_model {} (llama.cpp supports expand = 2 only)",
            cfg.d_inner, cfg.d_model
        ));
    }
    if cfg.use_bias {
        why.push("use_bias (in_proj / out_proj biases have no place in llama.cpp's Mamba)".into());
    }
    if !cfg.conv_bias {
        why.push("use_conv_bias false (llama.cpp's Mamba needs the conv bias)".into());
    }
    if why.is_empty() {
        Ok(())
    } else {
        bail!("cannot export to GGUF: {}", why.join("; "))
    }
}

/// Exports the checkpoint in `model_dir` to `out` (written atomically).
pub fn export_gguf(model_dir: &Path, out: &Path, dtype: ExportDtype) -> Result<ExportSummary> {
    let ck = crate::checkpoint::load(model_dir)?;
    check_supported(&ck.config).with_context(|| format!("checkpoint {}", model_dir.display()))?;
    let tok = model_dir.join("tokenizer.json");
    if !tok.is_file() {
        bail!(
            "checkpoint {}: no tokenizer.json; GGUF carries the tokenizer, so export needs one",
            model_dir.display()
        );
    }
    let vocab = vocab::Vocab::load(&tok, ck.config.vocab_size)?;
    let name = model_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "vet-mamba".into());
    let mut f = GgufFile::default();
    write_hparams(&mut f, &ck.config, &name, dtype);
    let n_vocab = vocab.tokens.len();
    vocab.write(&mut f);
    let a: Vec<Vec<f32>> = ck
        .params
        .layers
        .iter()
        .map(|l| l.a_log.data.iter().map(|v| -v.exp()).collect())
        .collect();
    f.tensors = tensors(&ck.config, &ck.params, &a, dtype);
    reference::fs::atomic_write_with(out, |file| f.write_to(&mut BufWriter::new(file)))
        .with_context(|| format!("writing {}", out.display()))?;
    let bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(ExportSummary {
        tensors: f.tensors.len(),
        bytes,
        vocab: n_vocab,
    })
}

/// The `general.*` and `mamba.*` keys, with the converter's values for the unused ones.
fn write_hparams(f: &mut GgufFile, cfg: &MambaConfig, name: &str, dtype: ExportDtype) {
    let u = |n: usize| Value::U32(n as u32);
    f.set("general.architecture", Value::Str("mamba".into()));
    f.set("general.type", Value::Str("model".into()));
    f.set("general.name", Value::Str(name.into()));
    f.set("mamba.context_length", Value::U32(1 << 20));
    f.set("mamba.embedding_length", u(cfg.d_model));
    f.set("mamba.feed_forward_length", u(0));
    f.set("mamba.attention.head_count", u(0));
    f.set("mamba.block_count", u(cfg.n_layer));
    f.set("mamba.ssm.conv_kernel", u(cfg.d_conv));
    f.set("mamba.ssm.inner_size", u(cfg.d_inner));
    f.set("mamba.ssm.state_size", u(cfg.d_state));
    f.set("mamba.ssm.time_step_rank", u(cfg.dt_rank));
    f.set(
        "mamba.attention.layer_norm_rms_epsilon",
        Value::F32(cfg.norm_eps as f32),
    );
    f.set("mamba.ssm.dt_b_c_rms", Value::Bool(false));
    f.set("general.file_type", Value::U32(dtype.file_type()));
    f.set("general.quantization_version", Value::U32(2));
}

/// Every tensor, named and typed as llama.cpp expects; `a[i]` is layer i's `-exp(A_log)`.
fn tensors<'a>(
    cfg: &MambaConfig,
    p: &'a Params<f32>,
    a: &'a [Vec<f32>],
    dtype: ExportDtype,
) -> Vec<TensorEntry<'a>> {
    let big = |shape: &[usize]| match dtype {
        ExportDtype::F32 => GgmlType::F32,
        ExportDtype::F16 => GgmlType::F16,
        ExportDtype::Q8_0 if shape[1].is_multiple_of(gguf::Q8_0_BLOCK) => GgmlType::Q8_0,
        ExportDtype::Q8_0 => GgmlType::F16,
    };
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, matrix: bool, v: &'a [f32]| {
        let dtype = if matrix { big(&shape) } else { GgmlType::F32 };
        out.push(TensorEntry {
            name,
            shape,
            dtype,
            values: Cow::Borrowed(v),
        });
    };
    let (dm, di) = (cfg.d_model, cfg.d_inner);
    push(
        "token_embd.weight".into(),
        vec![cfg.vocab_size, dm],
        true,
        &p.embeddings.data,
    );
    for (i, l) in p.layers.iter().enumerate() {
        let b = format!("blk.{i}");
        push(
            format!("{b}.attn_norm.weight"),
            vec![dm],
            false,
            &l.norm_weight.data,
        );
        push(
            format!("{b}.ssm_in.weight"),
            vec![2 * di, dm],
            true,
            &l.in_proj_weight.data,
        );
        let conv = &l.conv1d_weight.data;
        push(
            format!("{b}.ssm_conv1d.weight"),
            vec![di, cfg.d_conv],
            false,
            conv,
        );
        if let Some(cb) = &l.conv1d_bias {
            push(format!("{b}.ssm_conv1d.bias"), vec![di], false, &cb.data);
        }
        let x_rows = cfg.dt_rank + 2 * cfg.d_state;
        push(
            format!("{b}.ssm_x.weight"),
            vec![x_rows, di],
            true,
            &l.x_proj_weight.data,
        );
        push(
            format!("{b}.ssm_dt.weight"),
            vec![di, cfg.dt_rank],
            true,
            &l.dt_proj_weight.data,
        );
        push(
            format!("{b}.ssm_dt.bias"),
            vec![di],
            false,
            &l.dt_proj_bias.data,
        );
        push(format!("{b}.ssm_a"), vec![di, cfg.d_state], false, &a[i]);
        push(format!("{b}.ssm_d"), vec![di], false, &l.d.data);
        push(
            format!("{b}.ssm_out.weight"),
            vec![dm, di],
            true,
            &l.out_proj_weight.data,
        );
    }
    push(
        "output_norm.weight".into(),
        vec![dm],
        false,
        &p.norm_f_weight.data,
    );
    if let Some(h) = &p.lm_head {
        push(
            "output.weight".into(),
            vec![cfg.vocab_size, dm],
            true,
            &h.data,
        );
    }
    out
}
