//! Model parameters under their canonical Hugging Face names.
//!
//! The same struct holds weights, gradients and AdamW moments: every tensor of one has the
//! shape of the matching tensor of the other.

use crate::config::{MambaConfig, NormKind};
use crate::float::Float;
use crate::tensor::Tensor;

/// One residual block: norm + mixer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerParams<T> {
    /// `[d_model]`
    pub norm_weight: Tensor<T>,
    /// `[d_model]`, LayerNorm only.
    pub norm_bias: Option<Tensor<T>>,
    /// `[2 * d_inner, d_model]`: rows `0..d_inner` make x, the rest z.
    pub in_proj_weight: Tensor<T>,
    /// `[2 * d_inner]`, when `use_bias`.
    pub in_proj_bias: Option<Tensor<T>>,
    /// `[d_inner, 1, d_conv]`
    pub conv1d_weight: Tensor<T>,
    /// `[d_inner]`, when `conv_bias`.
    pub conv1d_bias: Option<Tensor<T>>,
    /// `[dt_rank + 2 * d_state, d_inner]`: rows dt_raw, then B, then C.
    pub x_proj_weight: Tensor<T>,
    /// `[d_inner, dt_rank]`
    pub dt_proj_weight: Tensor<T>,
    /// `[d_inner]`
    pub dt_proj_bias: Tensor<T>,
    /// `[d_inner, d_state]`; `A = -exp(A_log)`.
    pub a_log: Tensor<T>,
    /// `[d_inner]`
    pub d: Tensor<T>,
    /// `[d_model, d_inner]`
    pub out_proj_weight: Tensor<T>,
    /// `[d_model]`, when `use_bias`.
    pub out_proj_bias: Option<Tensor<T>>,
}

/// Every parameter of a `MambaForCausalLM` / `MambaLMHeadModel`.
#[derive(Clone, Debug, PartialEq)]
pub struct Params<T> {
    /// `[vocab_size, d_model]`
    pub embeddings: Tensor<T>,
    pub layers: Vec<LayerParams<T>>,
    /// `[d_model]`
    pub norm_f_weight: Tensor<T>,
    /// `[d_model]`, LayerNorm only.
    pub norm_f_bias: Option<Tensor<T>>,
    /// `[vocab_size, d_model]`, only when the config unties it from the embedding.
    pub lm_head: Option<Tensor<T>>,
}

/// Name and shape of every parameter of `cfg`, in canonical order.
pub fn param_specs(cfg: &MambaConfig) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let (dm, di, ds, dc, r) = (
        cfg.d_model,
        cfg.d_inner,
        cfg.d_state,
        cfg.d_conv,
        cfg.dt_rank,
    );
    out.push((
        "backbone.embeddings.weight".to_string(),
        vec![cfg.vocab_size, dm],
    ));
    for i in 0..cfg.n_layer {
        let p = format!("backbone.layers.{i}");
        out.push((format!("{p}.norm.weight"), vec![dm]));
        if cfg.norm == NormKind::Layer {
            out.push((format!("{p}.norm.bias"), vec![dm]));
        }
        let m = format!("{p}.mixer");
        out.push((format!("{m}.in_proj.weight"), vec![2 * di, dm]));
        if cfg.use_bias {
            out.push((format!("{m}.in_proj.bias"), vec![2 * di]));
        }
        out.push((format!("{m}.conv1d.weight"), vec![di, 1, dc]));
        if cfg.conv_bias {
            out.push((format!("{m}.conv1d.bias"), vec![di]));
        }
        out.push((format!("{m}.x_proj.weight"), vec![r + 2 * ds, di]));
        out.push((format!("{m}.dt_proj.weight"), vec![di, r]));
        out.push((format!("{m}.dt_proj.bias"), vec![di]));
        out.push((format!("{m}.A_log"), vec![di, ds]));
        out.push((format!("{m}.D"), vec![di]));
        out.push((format!("{m}.out_proj.weight"), vec![dm, di]));
        if cfg.use_bias {
            out.push((format!("{m}.out_proj.bias"), vec![dm]));
        }
    }
    out.push(("backbone.norm_f.weight".to_string(), vec![dm]));
    if cfg.norm == NormKind::Layer {
        out.push(("backbone.norm_f.bias".to_string(), vec![dm]));
    }
    if !cfg.tie_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, dm]));
    }
    out
}

/// True for parameters AdamW must not decay: `A_log`, `D`, every bias and every norm weight.
pub fn is_no_decay(name: &str) -> bool {
    name.ends_with(".bias")
        || name.ends_with(".A_log")
        || name.ends_with(".D")
        || name.contains(".norm.")
        || name.starts_with("backbone.norm_f.")
}

impl<T: Float> LayerParams<T> {
    /// One layer's tensors from `it`, in canonical order (see [`param_specs`]).
    fn from_iter_in_order(cfg: &MambaConfig, it: &mut impl Iterator<Item = Tensor<T>>) -> Self {
        let mut next = || it.next().expect("param_specs and LayerParams disagree");
        let norm_weight = next();
        let norm_bias = (cfg.norm == NormKind::Layer).then(&mut next);
        let in_proj_weight = next();
        let in_proj_bias = cfg.use_bias.then(&mut next);
        let conv1d_weight = next();
        let conv1d_bias = cfg.conv_bias.then(&mut next);
        let x_proj_weight = next();
        let dt_proj_weight = next();
        let dt_proj_bias = next();
        let a_log = next();
        let d = next();
        let out_proj_weight = next();
        let out_proj_bias = cfg.use_bias.then(&mut next);
        LayerParams {
            norm_weight,
            norm_bias,
            in_proj_weight,
            in_proj_bias,
            conv1d_weight,
            conv1d_bias,
            x_proj_weight,
            dt_proj_weight,
            dt_proj_bias,
            a_log,
            d,
            out_proj_weight,
            out_proj_bias,
        }
    }

    /// One layer from its tensors in canonical order (the `backbone.layers.{i}.*` entries of
    /// [`param_specs`], shapes checked by the caller).
    pub fn from_ordered(cfg: &MambaConfig, tensors: Vec<Tensor<T>>) -> Self {
        Self::from_iter_in_order(cfg, &mut tensors.into_iter())
    }

    /// An all-zero layer with the shapes of `cfg` (a layer's gradient buffer).
    pub fn zeros(cfg: &MambaConfig) -> Self {
        let mut it = param_specs(cfg)
            .into_iter()
            .filter(|(n, _)| n.starts_with("backbone.layers.0."))
            .map(|(_, s)| Tensor::zeros(&s));
        Self::from_iter_in_order(cfg, &mut it)
    }

    /// The layer's tensors, in canonical order.
    pub fn tensors(&self) -> Vec<&Tensor<T>> {
        let mut out = vec![&self.norm_weight];
        out.extend(self.norm_bias.as_ref());
        out.push(&self.in_proj_weight);
        out.extend(self.in_proj_bias.as_ref());
        out.push(&self.conv1d_weight);
        out.extend(self.conv1d_bias.as_ref());
        out.push(&self.x_proj_weight);
        out.push(&self.dt_proj_weight);
        out.push(&self.dt_proj_bias);
        out.push(&self.a_log);
        out.push(&self.d);
        out.push(&self.out_proj_weight);
        out.extend(self.out_proj_bias.as_ref());
        out
    }

    /// Total number of scalars of the layer.
    pub fn numel(&self) -> usize {
        self.tensors().iter().map(|t| t.numel()).sum()
    }
}

impl<T: Float> Params<T> {
    /// All-zero parameters with the shapes of `cfg` (gradient buffers, AdamW moments).
    pub fn zeros(cfg: &MambaConfig) -> Self {
        let mut it = param_specs(cfg).into_iter().map(|(_, s)| Tensor::zeros(&s));
        Self::from_iter_in_order(cfg, &mut it)
    }

    /// Builds from tensors given in canonical order (see [`param_specs`]).
    fn from_iter_in_order(cfg: &MambaConfig, it: &mut impl Iterator<Item = Tensor<T>>) -> Self {
        let embeddings = it.next().expect("param_specs and Params disagree");
        let layers = (0..cfg.n_layer)
            .map(|_| LayerParams::from_iter_in_order(cfg, it))
            .collect();
        let mut next = || it.next().expect("param_specs and Params disagree");
        let norm_f_weight = next();
        let norm_f_bias = (cfg.norm == NormKind::Layer).then(&mut next);
        let lm_head = (!cfg.tie_embeddings).then(&mut next);
        Params {
            embeddings,
            layers,
            norm_f_weight,
            norm_f_bias,
            lm_head,
        }
    }

    /// Builds from `(name, tensor)` pairs in canonical order. The caller has checked names and
    /// shapes against [`param_specs`].
    pub fn from_ordered(cfg: &MambaConfig, tensors: Vec<Tensor<T>>) -> Self {
        Self::from_iter_in_order(cfg, &mut tensors.into_iter())
    }

    /// Every tensor, in canonical order.
    pub fn tensors(&self) -> Vec<&Tensor<T>> {
        let mut out = vec![&self.embeddings];
        for l in &self.layers {
            out.extend(l.tensors());
        }
        out.push(&self.norm_f_weight);
        out.extend(self.norm_f_bias.as_ref());
        out.extend(self.lm_head.as_ref());
        out
    }

    /// Every tensor, mutably, in canonical order.
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor<T>> {
        let mut out = vec![&mut self.embeddings];
        for l in &mut self.layers {
            out.push(&mut l.norm_weight);
            out.extend(l.norm_bias.as_mut());
            out.push(&mut l.in_proj_weight);
            out.extend(l.in_proj_bias.as_mut());
            out.push(&mut l.conv1d_weight);
            out.extend(l.conv1d_bias.as_mut());
            out.push(&mut l.x_proj_weight);
            out.push(&mut l.dt_proj_weight);
            out.push(&mut l.dt_proj_bias);
            out.push(&mut l.a_log);
            out.push(&mut l.d);
            out.push(&mut l.out_proj_weight);
            out.extend(l.out_proj_bias.as_mut());
        }
        out.push(&mut self.norm_f_weight);
        out.extend(self.norm_f_bias.as_mut());
        out.extend(self.lm_head.as_mut());
        out
    }

    /// `(name, tensor)` pairs in canonical order.
    pub fn named(&self, cfg: &MambaConfig) -> Vec<(String, &Tensor<T>)> {
        param_specs(cfg)
            .into_iter()
            .map(|(n, _)| n)
            .zip(self.tensors())
            .collect()
    }

    /// The lm_head weight: the untied head, or the embedding when tied.
    pub fn lm_head_weight(&self) -> &Tensor<T> {
        self.lm_head.as_ref().unwrap_or(&self.embeddings)
    }

    /// Converts every tensor (f32 <-> f64).
    pub fn cast<U: Float>(&self, cfg: &MambaConfig) -> Params<U> {
        let v: Vec<Tensor<U>> = self.tensors().into_iter().map(|t| t.cast()).collect();
        Params::from_ordered(cfg, v)
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.tensors().iter().map(|t| t.numel()).sum()
    }
}
