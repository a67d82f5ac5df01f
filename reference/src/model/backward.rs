//! The model backward: every parameter gradient and the initial state's gradient.

use super::batch::Batch;
use super::forward::{ForwardCache, LayerCache};
use crate::config::MambaConfig;
use crate::error::{Error, Result};
use crate::float::{silu_grad, Float};
use crate::ops::conv1d::{conv1d_bwd, conv1d_last_bwd, ConvDims};
use crate::ops::linear::linear_bwd;
use crate::ops::norm::norm_bwd;
use crate::ops::selective_scan::{selective_scan_bwd_final, ScanDims, ScanInputs};
use crate::params::{LayerParams, Params};
use crate::state::State;

/// Joins `[n, a]`, `[n, b]`, ... column blocks into `[n, a + b + ...]`.
pub fn concat_cols<T: Float>(parts: &[(&[T], usize)], n: usize) -> Vec<T> {
    let total: usize = parts.iter().map(|p| p.1).sum();
    let mut out = Vec::with_capacity(n * total);
    for r in 0..n {
        for &(p, w) in parts {
            out.extend_from_slice(&p[r * w..(r + 1) * w]);
        }
    }
    out
}

/// Adds the scan's parameter gradients `[dA, dD, d(delta_bias)]` to a layer's: `A_log`
/// through `A = −exp(A_log)`, so `dA/dA_log = A` (`a`: the layer's `A`), then `D` and the
/// dt bias as they are.
pub fn add_scan_param_grads<T: Float>(gl: &mut LayerParams<T>, a: &[T], [ga, gd, gb]: [&[T]; 3]) {
    for ((g, &ga), &a) in gl.a_log.data.iter_mut().zip(ga).zip(a) {
        *g += ga * a;
    }
    for (g, &v) in gl.d.data.iter_mut().zip(gd) {
        *g += v;
    }
    for (g, &v) in gl.dt_proj_bias.data.iter_mut().zip(gb) {
        *g += v;
    }
}

/// The layer's initial state and its final state's gradient (`None`: zeros).
#[derive(Clone, Copy)]
struct LayerStates<'a, T> {
    conv_init: Option<&'a [T]>,
    ssm_init: Option<&'a [T]>,
    d_conv_last: Option<&'a [T]>,
    d_ssm_last: Option<&'a [T]>,
}

/// Backward of one layer given the gradient of its output `d_out`. Accumulates into `gl` and
/// returns the gradient w.r.t. the layer's input (through the mixer only, not the residual
/// shortcut), plus the initial conv window and SSM state gradients.
fn layer_bwd<T: Float>(
    cfg: &MambaConfig,
    lp: &LayerParams<T>,
    lc: &LayerCache<T>,
    input: &Batch,
    st: LayerStates<T>,
    d_out: &[T],
    gl: &mut LayerParams<T>,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let LayerStates {
        conv_init,
        ssm_init,
        d_conv_last,
        d_ssm_last,
    } = st;
    let n = input.rows();
    let (dm, di, ds, r) = (cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank);
    let d_gated = linear_bwd(
        &lc.gated,
        &lp.out_proj_weight.data,
        d_out,
        n,
        di,
        dm,
        &mut gl.out_proj_weight.data,
        gl.out_proj_bias.as_mut().map(|t| &mut t.data[..]),
    );
    let scan = ScanInputs {
        u: &lc.xs,
        delta: &lc.delta,
        a: &lc.a,
        b: &lc.b,
        c: &lc.c,
        d: &lp.d.data,
        z: Some(&lc.z),
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
    let sg = selective_scan_bwd_final(&scan, &d_gated, d_ssm_last);
    add_scan_param_grads(gl, &lc.a, [&sg.a, &sg.d, &sg.delta_bias]);
    let d_dt_raw = linear_bwd(
        &lc.dt_raw,
        &lp.dt_proj_weight.data,
        &sg.delta,
        n,
        r,
        di,
        &mut gl.dt_proj_weight.data,
        None,
    );
    let d_xdbl = concat_cols(&[(&d_dt_raw, r), (&sg.b, ds), (&sg.c, ds)], n);
    let d_xs = linear_bwd(
        &lc.xs,
        &lp.x_proj_weight.data,
        &d_xdbl,
        n,
        di,
        r + 2 * ds,
        &mut gl.x_proj_weight.data,
        None,
    );
    let du: Vec<T> = (0..n * di)
        .map(|i| (sg.u[i] + d_xs[i]) * silu_grad(lc.u[i]))
        .collect();
    let dims = ConvDims {
        batch: input.batch,
        seq_len: input.seq_len,
        d_inner: di,
        d_conv: cfg.d_conv,
    };
    let (mut dx_pre, mut d_conv_init) = conv1d_bwd(
        &lc.x_pre,
        &lp.conv1d_weight.data,
        &du,
        input.resets,
        conv_init,
        dims,
        &mut gl.conv1d_weight.data,
        gl.conv1d_bias.as_mut().map(|t| &mut t.data[..]),
    );
    if let Some(d) = d_conv_last {
        conv1d_last_bwd(d, input.resets, dims, &mut dx_pre, &mut d_conv_init);
    }
    let dz = sg.z.unwrap_or_default();
    let d_xz = concat_cols(&[(&dx_pre, di), (&dz, di)], n);
    let d_hn = linear_bwd(
        &lc.hn,
        &lp.in_proj_weight.data,
        &d_xz,
        n,
        dm,
        2 * di,
        &mut gl.in_proj_weight.data,
        gl.in_proj_bias.as_mut().map(|t| &mut t.data[..]),
    );
    let d_resid = norm_bwd(
        cfg.norm,
        &lc.resid_in,
        &lp.norm_weight.data,
        &lc.norm_stats,
        &d_hn,
        n,
        dm,
        &mut gl.norm_weight.data,
        gl.norm_bias.as_mut().map(|t| &mut t.data[..]),
    );
    (d_resid, d_conv_init, sg.h0)
}

/// Backward from `d_logits` `[batch, seq_len, vocab]` through the model. Accumulates every
/// parameter gradient into `grads` and returns the gradient of the initial state (zeros where
/// no state was given count as the state the forward started from).
pub fn backward<T: Float>(
    cfg: &MambaConfig,
    params: &Params<T>,
    input: &Batch,
    state: Option<&State<T>>,
    cache: &ForwardCache<T>,
    d_logits: &[T],
    grads: &mut Params<T>,
) -> Result<State<T>> {
    backward_final(cfg, params, input, state, cache, d_logits, None, grads)
}

/// [`backward`] with `d_final`, the gradient of the final state (from later windows of the
/// same rows: back-propagation through several windows), added in.
#[allow(clippy::too_many_arguments)]
pub fn backward_final<T: Float>(
    cfg: &MambaConfig,
    params: &Params<T>,
    input: &Batch,
    state: Option<&State<T>>,
    cache: &ForwardCache<T>,
    d_logits: &[T],
    d_final: Option<&State<T>>,
    grads: &mut Params<T>,
) -> Result<State<T>> {
    if let Some(s) = d_final {
        s.check(cfg, input.batch, "backward (final-state gradient)")?;
    }
    let (n, dm, v) = (input.rows(), cfg.d_model, cfg.vocab_size);
    if d_logits.len() != n * v || cache.layers.len() != cfg.n_layer {
        return Err(Error::Shape {
            op: "backward",
            msg: format!(
                "d_logits has {} values, expected [batch, seq_len, vocab] = [{}, {}, {}]",
                d_logits.len(),
                input.batch,
                input.seq_len,
                v
            ),
        });
    }
    let head = match grads.lm_head.as_mut() {
        Some(t) => &mut t.data,
        None => &mut grads.embeddings.data,
    };
    let d_hf = linear_bwd(
        &cache.hf,
        &params.lm_head_weight().data,
        d_logits,
        n,
        dm,
        v,
        head,
        None,
    );
    let mut d_resid = norm_bwd(
        cfg.norm,
        &cache.resid_final,
        &params.norm_f_weight.data,
        &cache.norm_f_stats,
        &d_hf,
        n,
        dm,
        &mut grads.norm_f_weight.data,
        grads.norm_f_bias.as_mut().map(|t| &mut t.data[..]),
    );
    let mut d_state = State::zeros(cfg, input.batch);
    for i in (0..cfg.n_layer).rev() {
        let st = LayerStates {
            conv_init: state.map(|s| s.conv_layer(i)),
            ssm_init: state.map(|s| s.ssm_layer(i)),
            d_conv_last: d_final.map(|s| s.conv_layer(i)),
            d_ssm_last: d_final.map(|s| s.ssm_layer(i)),
        };
        let (d_in, d_conv, d_ssm) = layer_bwd(
            cfg,
            &params.layers[i],
            &cache.layers[i],
            input,
            st,
            &d_resid,
            &mut grads.layers[i],
        );
        for (g, d) in d_resid.iter_mut().zip(&d_in) {
            *g += *d;
        }
        d_state.conv_layer_mut(i).copy_from_slice(&d_conv);
        d_state.ssm_layer_mut(i).copy_from_slice(&d_ssm);
    }
    for (i, &tok) in input.tokens.iter().enumerate() {
        let row = &mut grads.embeddings.data[tok as usize * dm..(tok as usize + 1) * dm];
        for (g, d) in row.iter_mut().zip(&d_resid[i * dm..(i + 1) * dm]) {
            *g += *d;
        }
    }
    Ok(d_state)
}
