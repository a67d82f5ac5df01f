//! # simd — the fast CPU tier
//!
//! Implements [`reference::Engine`] with `wide` vectors, `matrixmultiply` GEMMs and a thread
//! pool. Inference weights can be f32, bf16 or int8 (per-row scales); training runs in f32.

pub mod gemm;

use std::str::FromStr;

/// How the large matrices (embedding, projections, lm_head) are stored for inference.
/// Conv weights, `A_log`, `D`, norms and the dt bias always stay f32, and so do the states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightDtype {
    #[default]
    F32,
    Bf16,
    /// Symmetric int8 with one f32 scale per output row.
    Int8,
}

impl WeightDtype {
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::Int8 => "int8",
        }
    }
}

impl FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(WeightDtype::F32),
            "bf16" => Ok(WeightDtype::Bf16),
            "int8" => Ok(WeightDtype::Int8),
            o => Err(format!(
                "unknown weight dtype `{o}` (expected f32, bf16 or int8)"
            )),
        }
    }
}

/// Options of a [`SimdEngine`].
#[derive(Clone, Debug, Default)]
pub struct SimdOptions {
    /// Worker threads; 0 = one per available core.
    pub threads: usize,
    pub dtype: WeightDtype,
}

/// Whether this tier can run models yet.
pub fn available() -> Result<(), &'static str> {
    Err("the simd CPU tier is not implemented yet; use --device reference")
}
