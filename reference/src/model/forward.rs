//! The model forward, keeping what the backward needs.

use super::batch::Batch;
use crate::config::MambaConfig;
use crate::error::Result;
use crate::float::{silu, Float};
use crate::ops::conv1d::{conv1d_fwd, ConvDims};
use crate::ops::linear::linear_fwd;
use crate::ops::norm::{norm_fwd, NormStats};
use crate::ops::selective_scan::{selective_scan_fwd, ScanDims, ScanInputs};
use crate::params::{LayerParams, Params};
use crate::state::State;
use crate::tensor::Tensor;

/// Activations of one layer, all `[batch * seq_len, ·]`.
#[derive(Clone, Debug)]
pub struct LayerCache<T> {
    /// Residual stream entering the layer, `[n, d_model]`.
    pub resid_in: Vec<T>,
    pub norm_stats: NormStats<T>,
    /// Normed input, `[n, d_model]`.
    pub hn: Vec<T>,
    /// Conv input x (before the conv), `[n, d_inner]`.
    pub x_pre: Vec<T>,
    /// Gate z, `[n, d_inner]`.
    pub z: Vec<T>,
    /// Conv output before SiLU, `[n, d_inner]`.
    pub u: Vec<T>,
    /// silu(u): the scan input, `[n, d_inner]`.
    pub xs: Vec<T>,
    /// `[n, dt_rank]`, `[n, d_state]`, `[n, d_state]`.
    pub dt_raw: Vec<T>,
    pub b: Vec<T>,
    pub c: Vec<T>,
    /// dt_proj.weight · dt_raw (no bias), `[n, d_inner]`.
    pub delta: Vec<T>,
    /// `A = −exp(A_log)`, `[d_inner, d_state]`.
    pub a: Vec<T>,
    /// Gated scan output, `[n, d_inner]`.
    pub gated: Vec<T>,
}

/// Logits `[batch, seq_len, vocab]`, the final state, and the cache when it was kept.
pub type ForwardResult<T> = Result<(Tensor<T>, State<T>, Option<ForwardCache<T>>)>;

/// Everything the backward needs.
#[derive(Clone, Debug)]
pub struct ForwardCache<T> {
    pub layers: Vec<LayerCache<T>>,
    /// Residual stream entering `norm_f`, `[n, d_model]`.
    pub resid_final: Vec<T>,
    pub norm_f_stats: NormStats<T>,
    /// `norm_f` output, `[n, d_model]`.
    pub hf: Vec<T>,
}

/// Splits `[n, a + b]` rows into `[n, a]` and `[n, b]`.
pub(crate) fn split_cols<T: Float>(v: &[T], n: usize, widths: &[usize]) -> Vec<Vec<T>> {
    let total: usize = widths.iter().sum();
    let mut out: Vec<Vec<T>> = widths.iter().map(|w| Vec::with_capacity(n * w)).collect();
    for r in 0..n {
        let mut o = r * total;
        for (k, &w) in widths.iter().enumerate() {
            out[k].extend_from_slice(&v[o..o + w]);
            o += w;
        }
    }
    out
}

/// Forward of one layer. Returns its output (added to the residual by the caller), its cache
/// and its final (conv window, SSM) state.
fn layer_fwd<T: Float>(
    cfg: &MambaConfig,
    lp: &LayerParams<T>,
    resid: &[T],
    input: &Batch,
    conv_init: Option<&[T]>,
    ssm_init: Option<&[T]>,
) -> (Vec<T>, LayerCache<T>, Vec<T>, Vec<T>) {
    let n = input.rows();
    let (dm, di, ds, r) = (cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank);
    let nb = lp.norm_bias.as_ref().map(|t| &t.data[..]);
    let (hn, norm_stats) = norm_fwd(
        cfg.norm,
        resid,
        &lp.norm_weight.data,
        nb,
        cfg.norm_eps,
        n,
        dm,
    );
    let ib = lp.in_proj_bias.as_ref().map(|t| &t.data[..]);
    let xz = linear_fwd(&hn, &lp.in_proj_weight.data, ib, n, dm, 2 * di);
    let mut xz = split_cols(&xz, n, &[di, di]);
    let (z, x_pre) = (xz.pop().unwrap_or_default(), xz.pop().unwrap_or_default());
    let dims = ConvDims {
        batch: input.batch,
        seq_len: input.seq_len,
        d_inner: di,
        d_conv: cfg.d_conv,
    };
    let cb = lp.conv1d_bias.as_ref().map(|t| &t.data[..]);
    let (u, conv_last) = conv1d_fwd(
        &x_pre,
        &lp.conv1d_weight.data,
        cb,
        input.resets,
        conv_init,
        dims,
    );
    let xs: Vec<T> = u.iter().map(|&v| silu(v)).collect();
    let xdbl = linear_fwd(&xs, &lp.x_proj_weight.data, None, n, di, r + 2 * ds);
    let mut parts = split_cols(&xdbl, n, &[r, ds, ds]);
    let (c, b, dt_raw) = (
        parts.pop().unwrap_or_default(),
        parts.pop().unwrap_or_default(),
        parts.pop().unwrap_or_default(),
    );
    let delta = linear_fwd(&dt_raw, &lp.dt_proj_weight.data, None, n, r, di);
    let a: Vec<T> = lp.a_log.data.iter().map(|&v| -v.exp()).collect();
    let scan = ScanInputs {
        u: &xs,
        delta: &delta,
        a: &a,
        b: &b,
        c: &c,
        d: &lp.d.data,
        z: Some(&z),
        delta_bias: &lp.dt_proj_bias.data,
        resets: input.resets,
        h0: ssm_init,
        dims: ScanDims {
            batch: input.batch,
            seq_len: input.seq_len,
            d_inner: di,
            d_state: ds,
        },
    };
    let (gated, ssm_last) = selective_scan_fwd(&scan);
    let ob = lp.out_proj_bias.as_ref().map(|t| &t.data[..]);
    let out = linear_fwd(&gated, &lp.out_proj_weight.data, ob, n, di, dm);
    let cache = LayerCache {
        resid_in: resid.to_vec(),
        norm_stats,
        hn,
        x_pre,
        z,
        u,
        xs,
        dt_raw,
        b,
        c,
        delta,
        a,
        gated,
    };
    (out, cache, conv_last, ssm_last)
}

/// Forward over `input`, optionally from `state`. Returns logits `[batch, seq_len, vocab]`,
/// the state after the last position, and (when `keep`) the cache for [`super::backward`].
pub fn forward<T: Float>(
    cfg: &MambaConfig,
    params: &Params<T>,
    input: &Batch,
    state: Option<&State<T>>,
    keep: bool,
) -> ForwardResult<T> {
    input.check(cfg, "forward")?;
    if let Some(s) = state {
        s.check(cfg, input.batch, "forward")?;
    }
    let (n, dm, v) = (input.rows(), cfg.d_model, cfg.vocab_size);
    let mut resid = vec![T::ZERO; n * dm];
    for (i, &tok) in input.tokens.iter().enumerate() {
        let row = &params.embeddings.data[tok as usize * dm..(tok as usize + 1) * dm];
        resid[i * dm..(i + 1) * dm].copy_from_slice(row);
    }
    let mut out_state = State::zeros(cfg, input.batch);
    let mut caches = Vec::new();
    for (i, lp) in params.layers.iter().enumerate() {
        let conv_init = state.map(|s| s.conv_layer(i));
        let ssm_init = state.map(|s| s.ssm_layer(i));
        let (out, cache, conv_last, ssm_last) =
            layer_fwd(cfg, lp, &resid, input, conv_init, ssm_init);
        for (r, o) in resid.iter_mut().zip(&out) {
            *r += *o;
        }
        out_state.conv_layer_mut(i).copy_from_slice(&conv_last);
        out_state.ssm_layer_mut(i).copy_from_slice(&ssm_last);
        if keep {
            caches.push(cache);
        }
    }
    let fb = params.norm_f_bias.as_ref().map(|t| &t.data[..]);
    let (hf, norm_f_stats) = norm_fwd(
        cfg.norm,
        &resid,
        &params.norm_f_weight.data,
        fb,
        cfg.norm_eps,
        n,
        dm,
    );
    let logits = linear_fwd(&hf, &params.lm_head_weight().data, None, n, dm, v);
    let logits = Tensor::from_vec(&[input.batch, input.seq_len, v], logits);
    let cache = keep.then_some(ForwardCache {
        layers: caches,
        resid_final: resid,
        norm_f_stats,
        hf,
    });
    Ok((logits, out_state, cache))
}

/// The recurrent single-token step: one token per row (`tokens` `[batch]`), continuing from
/// `state` and updating it in place. Returns logits `[batch, vocab]`. `resets[b]` starts row `b`
/// afresh. It is the forward at `seq_len = 1`, so it runs the same operations in the same order
/// and gives the same bits as the full forward.
pub fn step<T: Float>(
    cfg: &MambaConfig,
    params: &Params<T>,
    tokens: &[u32],
    resets: Option<&[bool]>,
    state: &mut State<T>,
) -> Result<Tensor<T>> {
    let batch = tokens.len();
    let input = Batch {
        batch,
        seq_len: 1,
        tokens,
        resets,
    };
    let (logits, out, _) = forward(cfg, params, &input, Some(state), false)?;
    *state = out;
    Ok(Tensor::from_vec(&[batch, cfg.vocab_size], logits.data))
}
