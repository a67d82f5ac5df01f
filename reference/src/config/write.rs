//! Writing a config: the Hugging Face and mamba_ssm JSON layouts, and an atomic save.

use std::path::Path;

use serde_json::{json, Value};

use super::{MambaConfig, NormKind};
use crate::error::{Error, Result};

impl MambaConfig {
    /// The Hugging Face `MambaConfig` as transformers writes it (`MambaForCausalLM`). Only
    /// meaningful for RMSNorm models: Hugging Face Mamba has no LayerNorm.
    pub fn to_hf_json(&self) -> Value {
        json!({
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            "hidden_size": self.d_model,
            "intermediate_size": self.d_inner,
            "num_hidden_layers": self.n_layer,
            "vocab_size": self.vocab_size,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
            "state_size": self.d_state,
            "expand": self.expand,
            "conv_kernel": self.d_conv,
            "time_step_rank": self.dt_rank,
            "layer_norm_epsilon": self.norm_eps,
            "use_bias": self.use_bias,
            "use_conv_bias": self.conv_bias,
            "residual_in_fp32": self.residual_in_fp32,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "initializer_range": 0.1,
            "time_step_min": self.dt_min,
            "time_step_max": self.dt_max,
            "time_step_floor": self.dt_init_floor,
            "time_step_init_scheme": "random",
            "time_step_scale": 1.0,
            "rescale_prenorm_residual": false,
            "pad_token_id": 0,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "use_cache": true,
            "torch_dtype": "float32",
        })
    }

    /// The mamba_ssm `MambaConfig` (`MambaLMHeadModel`). mamba_ssm derives `d_inner` as
    /// `expand * d_model`; a config whose `d_inner` differs cannot be written this way
    /// ([`save`](Self::save) refuses it).
    pub fn to_mamba_ssm_json(&self) -> Value {
        json!({
            "d_model": self.d_model,
            "d_intermediate": 0,
            "n_layer": self.n_layer,
            "vocab_size": self.vocab_size,
            "ssm_cfg": {
                "layer": "Mamba1",
                "d_state": self.d_state,
                "d_conv": self.d_conv,
                "expand": self.expand,
                "dt_rank": self.dt_rank,
                "dt_min": self.dt_min,
                "dt_max": self.dt_max,
                "dt_init_floor": self.dt_init_floor,
                "conv_bias": self.conv_bias,
                "bias": self.use_bias,
            },
            "attn_layer_idx": [],
            "attn_cfg": {},
            "rms_norm": self.norm == NormKind::Rms,
            "residual_in_fp32": self.residual_in_fp32,
            "fused_add_norm": true,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
            "tie_embeddings": self.tie_embeddings,
            "norm_epsilon": self.norm_eps,
        })
    }

    /// The config in the format that can hold it: Hugging Face for RMSNorm models, mamba_ssm
    /// for LayerNorm models.
    pub fn to_json(&self) -> Value {
        match self.norm {
            NormKind::Rms => self.to_hf_json(),
            NormKind::Layer => self.to_mamba_ssm_json(),
        }
    }

    /// Validates, then writes [`to_json`](Self::to_json) as pretty JSON to `path`, atomically
    /// (temporary file in the same directory, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.validate()?;
        if self.norm == NormKind::Layer
            && self.expand.checked_mul(self.d_model) != Some(self.d_inner)
        {
            return Err(Error::Config {
                source_name: path.display().to_string(),
                key: "ssm_cfg.expand".to_string(),
                msg: format!(
                    "mamba_ssm format derives d_inner = expand * d_model = {} * {}, but d_inner is {}",
                    self.expand, self.d_model, self.d_inner
                ),
            });
        }
        let mut text =
            serde_json::to_string_pretty(&self.to_json()).map_err(|e| Error::ConfigSyntax {
                source_name: path.display().to_string(),
                msg: format!("cannot serialise: {e}"),
            })?;
        text.push('\n');
        crate::fs::atomic_write(path, text.as_bytes())
    }
}
