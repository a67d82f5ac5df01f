//! The model's weights as the forward reads them: the large matrices in the chosen storage
//! format (f32, bf16, int8; owned or memory-mapped), everything else f32, and `A = −exp(A_log)`
//! computed once.

use reference::{LayerParams, MambaConfig, Params};

use crate::weights::Mat;
use crate::WeightDtype;

/// One residual block.
#[derive(Debug)]
pub struct LayerWeights {
    pub norm_w: Vec<f32>,
    pub norm_b: Option<Vec<f32>>,
    /// `[2 · d_inner, d_model]`: rows `0..d_inner` make x, the rest z.
    pub in_proj: Mat,
    pub in_proj_b: Option<Vec<f32>>,
    /// `[d_inner, d_conv]`
    pub conv_w: Vec<f32>,
    pub conv_b: Option<Vec<f32>>,
    /// `[dt_rank + 2 · d_state, d_inner]`
    pub x_proj: Mat,
    /// `[d_inner, dt_rank]`
    pub dt_proj: Mat,
    pub dt_b: Vec<f32>,
    /// `A = −exp(A_log)`, `[d_inner, d_state]`.
    pub a: Vec<f32>,
    pub d: Vec<f32>,
    /// `[d_model, d_inner]`
    pub out_proj: Mat,
    pub out_b: Option<Vec<f32>>,
}

impl LayerWeights {
    /// One layer's weights in the storage of `dtype`, taking the f32 tensors' buffers (the
    /// matrices keep them as they are for f32; `A_log` becomes `A`).
    pub fn from_owned(l: LayerParams<f32>, dtype: WeightDtype) -> LayerWeights {
        let mat = |t: reference::Tensor<f32>| {
            let rows = t.shape[0];
            let cols = t.numel() / rows;
            Mat::from_f32(rows, cols, t.data, dtype)
        };
        let v = |t: reference::Tensor<f32>| t.data;
        LayerWeights {
            norm_w: v(l.norm_weight),
            norm_b: l.norm_bias.map(v),
            in_proj: mat(l.in_proj_weight),
            in_proj_b: l.in_proj_bias.map(v),
            conv_w: v(l.conv1d_weight),
            conv_b: l.conv1d_bias.map(v),
            x_proj: mat(l.x_proj_weight),
            dt_proj: mat(l.dt_proj_weight),
            dt_b: v(l.dt_proj_bias),
            a: a_from_log(&l.a_log.data),
            d: v(l.d),
            out_proj: mat(l.out_proj_weight),
            out_b: l.out_proj_bias.map(v),
        }
    }
}

/// Every weight of a model.
#[derive(Debug)]
pub struct Weights {
    pub dtype: WeightDtype,
    /// `[vocab, d_model]`
    pub embed: Mat,
    pub layers: Vec<LayerWeights>,
    pub norm_f_w: Vec<f32>,
    pub norm_f_b: Option<Vec<f32>>,
    /// `[vocab, d_model]` when untied.
    pub lm_head: Option<Mat>,
}

/// `−exp(A_log)` with the reference's `libm` exp, so f32 weights give the reference's `A`.
pub fn a_from_log(a_log: &[f32]) -> Vec<f32> {
    a_log.iter().map(|&v| -libm::expf(v)).collect()
}

impl Weights {
    /// Converts parameters to the storage of `dtype`.
    pub fn from_params(cfg: &MambaConfig, p: &Params<f32>, dtype: WeightDtype) -> Weights {
        let mat = |t: &reference::Tensor<f32>| {
            Mat::from_f32(t.shape[0], t.numel() / t.shape[0], t.data.clone(), dtype)
        };
        let v = |t: &reference::Tensor<f32>| t.data.clone();
        let layers = p
            .layers
            .iter()
            .map(|l| LayerWeights::from_owned(l.clone(), dtype))
            .collect();
        debug_assert_eq!(p.layers.len(), cfg.n_layer);
        Weights {
            dtype,
            embed: mat(&p.embeddings),
            layers,
            norm_f_w: v(&p.norm_f_weight),
            norm_f_b: p.norm_f_bias.as_ref().map(v),
            lm_head: p.lm_head.as_ref().map(mat),
        }
    }

    /// The matrix the logits come from (the embedding when tied).
    pub fn head(&self) -> &Mat {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes of weights read to decode one token (every matrix once, the embedding row aside).
    pub fn decode_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.in_proj.bytes() + l.x_proj.bytes() + l.dt_proj.bytes() + l.out_proj.bytes())
            .sum();
        layers + self.head().bytes()
    }

    /// Whether the big matrices are read straight from a memory-mapped file.
    pub fn is_mapped(&self) -> bool {
        self.embed.is_mapped()
    }
}
