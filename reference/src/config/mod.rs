//! `MambaConfig`: the model's hyper-parameters, read from Hugging Face or mamba_ssm `config.json`.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

mod write;

/// Which normalisation the blocks and `norm_f` use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// RMSNorm: weight only (Hugging Face `MambaForCausalLM`, mamba_ssm `rms_norm: true`).
    Rms,
    /// LayerNorm: weight and bias (mamba_ssm `rms_norm: false`).
    Layer,
}

/// Hyper-parameters of a Mamba-1 language model. `vocab_size` is the number of embedding rows,
/// after mamba_ssm's padding to `pad_vocab_size_multiple`.
#[derive(Clone, Debug, PartialEq)]
pub struct MambaConfig {
    pub d_model: usize,
    pub n_layer: usize,
    /// Embedding rows (padded).
    pub vocab_size: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub expand: usize,
    /// `expand * d_model` unless the config says otherwise (`intermediate_size`).
    pub d_inner: usize,
    pub dt_rank: usize,
    pub norm: NormKind,
    pub norm_eps: f64,
    pub tie_embeddings: bool,
    /// Bias on `in_proj` and `out_proj`.
    pub use_bias: bool,
    /// Bias on `conv1d`.
    pub conv_bias: bool,
    pub residual_in_fp32: bool,
    /// mamba_ssm pads the vocabulary up to a multiple of this (1 = no padding).
    pub pad_vocab_size_multiple: usize,
    pub dt_min: f64,
    pub dt_max: f64,
    pub dt_init_floor: f64,
}

impl MambaConfig {
    /// A config with the upstream defaults for everything but the sizes.
    pub fn new(d_model: usize, n_layer: usize, vocab_size: usize) -> Self {
        MambaConfig {
            d_model,
            n_layer,
            vocab_size,
            d_state: 16,
            d_conv: 4,
            expand: 2,
            d_inner: 2 * d_model,
            dt_rank: d_model.div_ceil(16),
            norm: NormKind::Rms,
            norm_eps: 1e-5,
            tie_embeddings: true,
            use_bias: false,
            conv_bias: true,
            residual_in_fp32: true,
            pad_vocab_size_multiple: 1,
            dt_min: 1e-3,
            dt_max: 1e-1,
            dt_init_floor: 1e-4,
        }
    }

    /// Rows of `x_proj`: dt_rank + 2 * d_state.
    pub fn x_proj_rows(&self) -> usize {
        self.dt_rank + 2 * self.d_state
    }
}

/// The key a config file uses for each field, so that errors name what the user wrote.
struct KeyNames {
    d_model: &'static str,
    n_layer: &'static str,
    vocab_size: &'static str,
    d_state: &'static str,
    d_conv: &'static str,
    expand: &'static str,
    d_inner: &'static str,
    dt_rank: &'static str,
    norm_eps: &'static str,
    pad_vocab_size_multiple: &'static str,
    dt_min: &'static str,
    dt_max: &'static str,
    dt_init_floor: &'static str,
}

const HF_KEYS: KeyNames = KeyNames {
    d_model: "hidden_size",
    n_layer: "num_hidden_layers",
    vocab_size: "vocab_size",
    d_state: "state_size",
    d_conv: "conv_kernel",
    expand: "expand",
    d_inner: "intermediate_size",
    dt_rank: "time_step_rank",
    norm_eps: "layer_norm_epsilon",
    pad_vocab_size_multiple: "pad_vocab_size_multiple",
    dt_min: "time_step_min",
    dt_max: "time_step_max",
    dt_init_floor: "time_step_floor",
};

const SSM_KEYS: KeyNames = KeyNames {
    d_model: "d_model",
    n_layer: "n_layer",
    vocab_size: "vocab_size",
    d_state: "ssm_cfg.d_state",
    d_conv: "ssm_cfg.d_conv",
    expand: "ssm_cfg.expand",
    d_inner: "ssm_cfg.expand",
    dt_rank: "ssm_cfg.dt_rank",
    norm_eps: "norm_epsilon",
    pad_vocab_size_multiple: "pad_vocab_size_multiple",
    dt_min: "ssm_cfg.dt_min",
    dt_max: "ssm_cfg.dt_max",
    dt_init_floor: "ssm_cfg.dt_init_floor",
};

/// One JSON object of a config file, read key by key with errors that name the key.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    /// `""` at the top level, `"ssm_cfg."` inside `ssm_cfg`.
    prefix: &'static str,
    source_name: &'a str,
}

/// Short description of a JSON value for error messages.
fn describe(v: &Value) -> String {
    let full = v.to_string();
    let mut s: String = full.chars().take(40).collect();
    if s.len() < full.len() {
        s.push_str("...");
    }
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(_) => format!("the boolean {s}"),
        Value::Number(_) => format!("the number {s}"),
        Value::String(_) => format!("the string {s}"),
        Value::Array(_) => format!("the array {s}"),
        Value::Object(_) => format!("the object {s}"),
    }
}

impl<'a> Obj<'a> {
    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::Config {
            source_name: self.source_name.to_string(),
            key: format!("{}{key}", self.prefix),
            msg: msg.into(),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    fn usize_of(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                self.err(
                    key,
                    format!("must be a non-negative integer, got {}", describe(v)),
                )
            })
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        match self.get(key) {
            Some(v) => self.usize_of(key, v),
            None => Err(self.err(key, "is missing")),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        self.get(key).map_or(Ok(default), |v| self.usize_of(key, v))
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(key, format!("must be a number, got {}", describe(v)))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                self.err(key, format!("must be true or false, got {}", describe(v)))
            }),
        }
    }

    /// A rank that is either `"auto"` (ceil(d_model / 16)) or a non-negative integer.
    fn rank_or_auto(&self, key: &str, d_model: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(d_model.div_ceil(16)),
            Some(Value::String(s)) if s == "auto" => Ok(d_model.div_ceil(16)),
            Some(v @ Value::Number(_)) => self.usize_of(key, v),
            Some(v) => Err(self.err(
                key,
                format!("must be \"auto\" or an integer, got {}", describe(v)),
            )),
        }
    }

    /// A nested object (`ssm_cfg`); absent or null reads as empty.
    fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.err(key, format!("must be an object, got {}", describe(v)))),
        }
    }
}

/// `a * b` or an error naming `key`.
fn checked_mul(obj: &Obj, key: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| obj.err(key, format!("{a} * {b} is too large")))
}

impl MambaConfig {
    /// Parses a Hugging Face (`MambaForCausalLM`) or mamba_ssm (`MambaLMHeadModel`)
    /// `config.json`, then [`validate`](Self::validate)s it. `source_name` (usually the path)
    /// appears in every error. A Hugging Face config is recognised by `hidden_size` or
    /// `model_type: "mamba"`, a mamba_ssm config by `d_model`. Unknown keys are ignored.
    pub fn from_json_str(text: &str, source_name: &str) -> Result<MambaConfig> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::ConfigSyntax {
            source_name: source_name.to_string(),
            msg: format!("invalid JSON: {e}"),
        })?;
        let Value::Object(map) = &value else {
            return Err(Error::ConfigSyntax {
                source_name: source_name.to_string(),
                msg: format!("expected a JSON object, got {}", describe(&value)),
            });
        };
        let top = Obj {
            map,
            prefix: "",
            source_name,
        };
        match map.get("model_type") {
            None => {}
            Some(Value::String(t)) if t == "mamba" => {}
            Some(v) => {
                return Err(top.err(
                    "model_type",
                    format!("is {}; only Mamba-1 (\"mamba\") is supported", describe(v)),
                ))
            }
        }
        let (cfg, names) = if map.contains_key("hidden_size") || map.contains_key("model_type") {
            (parse_hf(&top)?, &HF_KEYS)
        } else if map.contains_key("d_model") {
            (parse_mamba_ssm(&top)?, &SSM_KEYS)
        } else {
            return Err(top.err(
                "hidden_size",
                "is missing (neither a Hugging Face `hidden_size` nor a mamba_ssm `d_model` key is present)",
            ));
        };
        cfg.validate_with(source_name, names)?;
        Ok(cfg)
    }

    /// Reads `config.json` from a file, or from `path/config.json` when `path` is a directory.
    pub fn load(path: &Path) -> Result<MambaConfig> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        Self::from_json_str(&text, &file.display().to_string())
    }

    /// Checks every value is in range. Errors name the key of the format [`to_json`](Self::to_json)
    /// writes (Hugging Face names for RMSNorm models, mamba_ssm names for LayerNorm ones).
    pub fn validate(&self) -> Result<()> {
        let names = match self.norm {
            NormKind::Rms => &HF_KEYS,
            NormKind::Layer => &SSM_KEYS,
        };
        self.validate_with("MambaConfig", names)
    }

    fn validate_with(&self, source_name: &str, k: &KeyNames) -> Result<()> {
        let err = |key: &str, msg: String| Error::Config {
            source_name: source_name.to_string(),
            key: key.to_string(),
            msg,
        };
        let sizes = [
            (k.d_model, self.d_model),
            (k.n_layer, self.n_layer),
            (k.vocab_size, self.vocab_size),
            (k.d_state, self.d_state),
            (k.d_conv, self.d_conv),
            (k.expand, self.expand),
            (k.d_inner, self.d_inner),
            (k.dt_rank, self.dt_rank),
            (k.pad_vocab_size_multiple, self.pad_vocab_size_multiple),
        ];
        for (key, v) in sizes {
            if v == 0 {
                return Err(err(key, "must be at least 1, got 0".to_string()));
            }
        }
        if self.vocab_size.checked_rem(self.pad_vocab_size_multiple) != Some(0) {
            return Err(err(
                k.vocab_size,
                format!(
                    "{} is not a multiple of pad_vocab_size_multiple {}",
                    self.vocab_size, self.pad_vocab_size_multiple
                ),
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(err(
                k.norm_eps,
                format!("must be a finite number > 0, got {}", self.norm_eps),
            ));
        }
        if !(self.dt_min.is_finite() && self.dt_min > 0.0) {
            return Err(err(
                k.dt_min,
                format!("must be a finite number > 0, got {}", self.dt_min),
            ));
        }
        if !(self.dt_max.is_finite() && self.dt_max >= self.dt_min) {
            return Err(err(
                k.dt_max,
                format!(
                    "must be finite and >= {} = {}, got {}",
                    k.dt_min, self.dt_min, self.dt_max
                ),
            ));
        }
        if !(self.dt_init_floor.is_finite() && self.dt_init_floor >= 0.0) {
            return Err(err(
                k.dt_init_floor,
                format!("must be a finite number >= 0, got {}", self.dt_init_floor),
            ));
        }
        self.check_tensor_sizes(k).map_err(|key| {
            err(
                key,
                "is too large: a parameter tensor would not fit in memory".to_string(),
            )
        })
    }

    /// Every parameter's byte size must fit in `usize`; on failure, the key to blame.
    fn check_tensor_sizes(&self, k: &KeyNames) -> std::result::Result<(), &'static str> {
        let fits = |a: usize, b: usize, c: usize| {
            a.checked_mul(b)
                .and_then(|n| n.checked_mul(c))
                .and_then(|n| n.checked_mul(8))
                .is_some()
        };
        let x_proj_rows = self
            .d_state
            .checked_mul(2)
            .and_then(|n| n.checked_add(self.dt_rank));
        let checks = [
            (k.vocab_size, fits(self.vocab_size, self.d_model, 1)),
            (k.d_inner, fits(self.d_inner, self.d_model, 2)),
            (k.d_state, fits(self.d_inner, self.d_state, 1)),
            (k.d_conv, fits(self.d_inner, self.d_conv, 1)),
            (
                k.dt_rank,
                x_proj_rows.is_some_and(|r| fits(r, self.d_inner, 1)),
            ),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            Some((key, _)) => Err(key),
            None => Ok(()),
        }
    }
}

/// Reads Hugging Face `MambaConfig` keys. Hugging Face models always use RMSNorm.
fn parse_hf(o: &Obj) -> Result<MambaConfig> {
    let d_model = o.usize_req("hidden_size")?;
    let expand = o.usize_or("expand", 2)?;
    let d_inner = match o.get("intermediate_size") {
        Some(v) => o.usize_of("intermediate_size", v)?,
        None => checked_mul(o, "expand", expand, d_model)?,
    };
    let vocab_size = o.usize_req("vocab_size")?;
    // transformers ignores `pad_vocab_size_multiple` (its `vocab_size` is the row count); keep
    // it only when it describes this vocabulary, else treat the vocabulary as unpadded (1).
    let pad = match o.usize_or("pad_vocab_size_multiple", 1)? {
        p if p >= 1 && vocab_size.checked_rem(p) == Some(0) => p,
        _ => 1,
    };
    Ok(MambaConfig {
        d_model,
        n_layer: o.usize_req("num_hidden_layers")?,
        vocab_size,
        d_state: o.usize_or("state_size", 16)?,
        d_conv: o.usize_or("conv_kernel", 4)?,
        expand,
        d_inner,
        dt_rank: o.rank_or_auto("time_step_rank", d_model)?,
        norm: NormKind::Rms,
        norm_eps: o.f64_or("layer_norm_epsilon", 1e-5)?,
        tie_embeddings: o.bool_or("tie_word_embeddings", true)?,
        use_bias: o.bool_or("use_bias", false)?,
        conv_bias: o.bool_or("use_conv_bias", true)?,
        residual_in_fp32: o.bool_or("residual_in_fp32", true)?,
        pad_vocab_size_multiple: pad,
        dt_min: o.f64_or("time_step_min", 1e-3)?,
        dt_max: o.f64_or("time_step_max", 1e-1)?,
        dt_init_floor: o.f64_or("time_step_floor", 1e-4)?,
    })
}

/// Rejects the parts of a mamba_ssm config that are not a plain Mamba-1 stack.
fn check_mamba1_only(top: &Obj, ssm: &Obj) -> Result<()> {
    match ssm.get("layer") {
        None => {}
        Some(Value::String(s)) if s == "Mamba1" => {}
        Some(v) => {
            return Err(ssm.err(
                "layer",
                format!("is {}; only \"Mamba1\" is supported", describe(v)),
            ))
        }
    }
    match top.get("d_intermediate") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(0) => {}
        Some(v) => {
            return Err(top.err(
                "d_intermediate",
                format!(
                    "is {}; MLP blocks are not supported (must be 0)",
                    describe(v)
                ),
            ))
        }
    }
    match top.get("attn_layer_idx") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(v) => Err(top.err(
            "attn_layer_idx",
            format!(
                "is {}; attention layers are not supported (must be [])",
                describe(v)
            ),
        )),
    }
}

/// Reads mamba_ssm `MambaConfig` keys; pads `vocab_size` up to `pad_vocab_size_multiple`.
fn parse_mamba_ssm(top: &Obj) -> Result<MambaConfig> {
    let empty = Map::new();
    let ssm = Obj {
        map: top.object("ssm_cfg")?.unwrap_or(&empty),
        prefix: "ssm_cfg.",
        source_name: top.source_name,
    };
    check_mamba1_only(top, &ssm)?;
    let d_model = top.usize_req("d_model")?;
    let expand = ssm.usize_or("expand", 2)?;
    let pad = top.usize_or("pad_vocab_size_multiple", 8)?;
    if pad == 0 {
        return Err(top.err("pad_vocab_size_multiple", "must be at least 1, got 0"));
    }
    let vocab_raw = top.usize_req("vocab_size")?;
    let vocab_size = vocab_raw
        .div_ceil(pad)
        .checked_mul(pad)
        .ok_or_else(|| top.err("vocab_size", format!("{vocab_raw} is too large")))?;
    let rms_norm = top.bool_or("rms_norm", true)?;
    Ok(MambaConfig {
        d_model,
        n_layer: top.usize_req("n_layer")?,
        vocab_size,
        d_state: ssm.usize_or("d_state", 16)?,
        d_conv: ssm.usize_or("d_conv", 4)?,
        expand,
        d_inner: checked_mul(&ssm, "expand", expand, d_model)?,
        dt_rank: ssm.rank_or_auto("dt_rank", d_model)?,
        norm: if rms_norm {
            NormKind::Rms
        } else {
            NormKind::Layer
        },
        norm_eps: top.f64_or("norm_epsilon", 1e-5)?,
        tie_embeddings: top.bool_or("tie_embeddings", true)?,
        use_bias: ssm.bool_or("bias", false)?,
        conv_bias: ssm.bool_or("conv_bias", true)?,
        residual_in_fp32: top.bool_or("residual_in_fp32", true)?,
        pad_vocab_size_multiple: pad,
        dt_min: ssm.f64_or("dt_min", 1e-3)?,
        dt_max: ssm.f64_or("dt_max", 1e-1)?,
        dt_init_floor: ssm.f64_or("dt_init_floor", 1e-4)?,
    })
}
