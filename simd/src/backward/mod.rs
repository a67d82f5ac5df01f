//! The model backward on the pool: the fast twin of `reference::model::backward`.
//!
//! Same semantics (every parameter gradient is *added* to `grads`; the initial state's
//! gradient is returned, zeros standing for "no state"), computed with threaded GEMMs for
//! every linear layer and the lm_head, rows of the norms in parallel, and the conv and the
//! selective scan over channel blocks with eight-lane vectors. Every sum that crosses tasks
//! runs in a fixed order set by the shapes alone, so the gradients are the same bits for any
//! thread count.

use rayon::prelude::*;
use rayon::ThreadPool;
use reference::engine::ParamGroup;
use reference::model::{Batch, ForwardCache, LayerCache};
use reference::ops::conv1d::{conv1d_last_bwd, ConvDims};
use reference::{Error, LayerParams, MambaConfig, Params, Result, State};

use crate::ops::conv1d::{conv1d_bwd, ConvBwdInputs};
use crate::ops::linear::{linear_bwd, linear_bwd_bias, linear_bwd_input_into, linear_bwd_weight};
use crate::ops::norm::norm_bwd;
use crate::ops::selective_scan::{selective_scan_bwd, Scan, ScanBwdInputs};

/// Elements per task of the element-wise loops.
const ELEMS: usize = 1 << 14;

/// `du = (du + d_u_scan) · silu'(u)`, in place over `du` (the gradient w.r.t. the conv's
/// output, from the x_proj path and the scan's input).
fn silu_bwd_into(pool: &ThreadPool, du: &mut [f32], d_u_scan: &[f32], u: &[f32]) {
    pool.install(|| {
        du.par_chunks_mut(ELEMS)
            .zip(d_u_scan.par_chunks(ELEMS))
            .zip(u.par_chunks(ELEMS))
            .for_each(|((o, s), u)| {
                let mut i = 0;
                while i < o.len() {
                    let w = crate::vecmath::LANES.min(o.len() - i);
                    let (_, grad) = crate::vecmath::silu_and_grad8(crate::vecmath::load(u, i, w));
                    let v = (crate::vecmath::load(s, i, w) + crate::vecmath::load(o, i, w)) * grad;
                    crate::vecmath::store(v, o, i, w);
                    i += w;
                }
            })
    });
}

/// Backward of in_proj given the gradients of its x half (`dx_pre`) and z half (`dz`), both
/// `[n, d_inner]`: accumulates its weight (and bias) gradient into `gl`, returns the gradient
/// w.r.t. its input `hn` `[n, d_model]`. `dims` = `(n, d_model, d_inner)`.
fn in_proj_bwd(
    pool: &ThreadPool,
    lp: &LayerParams<f32>,
    hn: &[f32],
    dx_pre: &[f32],
    dz: &[f32],
    gl: &mut LayerParams<f32>,
    (n, dm, di): (usize, usize, usize),
) -> Vec<f32> {
    // Rows 0..d_inner make x, the rest z; two GEMMs per product instead of a concat.
    let (gw_x, gw_z) = gl.in_proj_weight.data.split_at_mut(di * dm);
    linear_bwd_weight(pool, hn, dx_pre, n, dm, di, gw_x);
    linear_bwd_weight(pool, hn, dz, n, dm, di, gw_z);
    if let Some(gb) = gl.in_proj_bias.as_mut() {
        let (gb_x, gb_z) = gb.data.split_at_mut(di);
        linear_bwd_bias(dx_pre, n, di, gb_x);
        linear_bwd_bias(dz, n, di, gb_z);
    }
    let (w_x, w_z) = lp.in_proj_weight.data.split_at(di * dm);
    let mut d_hn = vec![0.0; n * dm];
    linear_bwd_input_into(pool, w_x, dx_pre, n, dm, di, &mut d_hn);
    crate::gemm::sgemm(
        pool, n, di, dm, 1.0, dz, di, 1, w_z, dm, 1, 1.0, &mut d_hn, dm, 1,
    );
    d_hn
}

/// A layer's initial state and its final state's gradient (`None`: zeros).
#[derive(Clone, Copy)]
pub(crate) struct LayerStates<'a> {
    pub conv_init: Option<&'a [f32]>,
    pub ssm_init: Option<&'a [f32]>,
    pub d_conv_last: Option<&'a [f32]>,
    pub d_ssm_last: Option<&'a [f32]>,
}

/// Backward of one layer given the gradient of its output `d_out`; as the reference's
/// `layer_bwd`. Returns the gradient w.r.t. the layer input (mixer path only) and the initial
/// conv window and SSM state gradients.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_bwd(
    pool: &ThreadPool,
    cfg: &MambaConfig,
    lp: &LayerParams<f32>,
    lc: &LayerCache<f32>,
    input: &Batch,
    states: LayerStates,
    d_out: &[f32],
    gl: &mut LayerParams<f32>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let LayerStates {
        conv_init,
        ssm_init,
        d_conv_last,
        d_ssm_last,
    } = states;
    let n = input.rows();
    let (dm, di, ds, r) = (cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank);
    let d_gated = linear_bwd(
        pool,
        &lc.gated,
        &lp.out_proj_weight.data,
        d_out,
        n,
        di,
        dm,
        &mut gl.out_proj_weight.data,
        gl.out_proj_bias.as_mut().map(|t| &mut t.data[..]),
    );
    let scan = ScanBwdInputs {
        scan: Scan {
            u: &lc.xs,
            delta: &lc.delta,
            a: &lc.a,
            b: &lc.b,
            c: &lc.c,
            d: &lp.d.data,
            z: &lc.z,
            delta_bias: &lp.dt_proj_bias.data,
            resets: input.resets,
            batch: input.batch,
            seq_len: input.seq_len,
            d_inner: di,
            d_state: ds,
        },
        h0: ssm_init,
        d_last: d_ssm_last,
        portable: false,
    };
    let sg = selective_scan_bwd(pool, &scan, &d_gated);
    reference::model::add_scan_param_grads(gl, &lc.a, [&sg.a, &sg.d, &sg.delta_bias]);
    let d_dt_raw = linear_bwd(
        pool,
        &lc.dt_raw,
        &lp.dt_proj_weight.data,
        &sg.delta,
        n,
        r,
        di,
        &mut gl.dt_proj_weight.data,
        None,
    );
    let d_xdbl = reference::model::concat_cols(&[(&d_dt_raw, r), (&sg.b, ds), (&sg.c, ds)], n);
    let mut du = linear_bwd(
        pool,
        &lc.xs,
        &lp.x_proj_weight.data,
        &d_xdbl,
        n,
        di,
        r + 2 * ds,
        &mut gl.x_proj_weight.data,
        None,
    );
    // du = (d_xs + scan's du) · silu'(u), in place over d_xs.
    silu_bwd_into(pool, &mut du, &sg.u, &lc.u);
    let conv = ConvBwdInputs {
        x: &lc.x_pre,
        w: &lp.conv1d_weight.data,
        resets: input.resets,
        init: conv_init,
        batch: input.batch,
        seq_len: input.seq_len,
        d_inner: di,
        d_conv: cfg.d_conv,
    };
    let (mut dx_pre, mut d_conv_init) = conv1d_bwd(
        pool,
        &conv,
        &du,
        &mut gl.conv1d_weight.data,
        gl.conv1d_bias.as_mut().map(|t| &mut t.data[..]),
    );
    if let Some(d) = d_conv_last {
        let dims = ConvDims {
            batch: input.batch,
            seq_len: input.seq_len,
            d_inner: di,
            d_conv: cfg.d_conv,
        };
        conv1d_last_bwd(d, input.resets, dims, &mut dx_pre, &mut d_conv_init);
    }
    let d_hn = in_proj_bwd(pool, lp, &lc.hn, &dx_pre, &sg.z, gl, (n, dm, di));
    let d_resid = norm_bwd(
        pool,
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

/// Backward from `d_logits` `[batch, seq_len, vocab]`, as `reference::model::backward`:
/// adds every parameter gradient to `grads` and returns the initial state's gradient. `cache`
/// is the forward's (`reference::model::forward` with `keep`, or this tier's own).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    pool: &ThreadPool,
    cfg: &MambaConfig,
    params: &Params<f32>,
    input: &Batch,
    state: Option<&State<f32>>,
    cache: &ForwardCache<f32>,
    d_logits: &[f32],
    grads: &mut Params<f32>,
) -> Result<State<f32>> {
    backward_final(
        pool, cfg, params, input, state, cache, d_logits, None, grads,
    )
}

/// [`backward`] with `d_final`, the final state's gradient (from later windows of the same
/// rows), added in: `reference::model::backward_final`'s twin.
#[allow(clippy::too_many_arguments)]
pub fn backward_final(
    pool: &ThreadPool,
    cfg: &MambaConfig,
    params: &Params<f32>,
    input: &Batch,
    state: Option<&State<f32>>,
    cache: &ForwardCache<f32>,
    d_logits: &[f32],
    d_final: Option<&State<f32>>,
    grads: &mut Params<f32>,
) -> Result<State<f32>> {
    let mut none = |_: ParamGroup, _: &Params<f32>| Ok(());
    backward_each(
        pool, cfg, params, input, state, cache, d_logits, d_final, grads, &mut none,
    )
}

/// [`backward_final`] that calls `done(group, grads)` as soon as the group's gradient in
/// `grads` is final: after each layer's backward (in reverse order), and for the outer group
/// after the embedding lookup's backward. Each piece runs on the pool (a no-op when the
/// caller is already on it) and `done` on the caller's thread, so the same kernels run in the
/// same order: the same bits as [`backward_final`]. An error from `done` stops the backward.
#[allow(clippy::too_many_arguments)]
pub fn backward_each(
    pool: &ThreadPool,
    cfg: &MambaConfig,
    params: &Params<f32>,
    input: &Batch,
    state: Option<&State<f32>>,
    cache: &ForwardCache<f32>,
    d_logits: &[f32],
    d_final: Option<&State<f32>>,
    grads: &mut Params<f32>,
    done: &mut dyn FnMut(ParamGroup, &Params<f32>) -> Result<()>,
) -> Result<State<f32>> {
    check(cfg, input, state, cache, d_logits, d_final)?;
    let n = input.rows();
    let mut d_resid = pool.install(|| head_bwd(pool, cfg, params, cache, d_logits, n, grads));
    let mut d_state = State::zeros(cfg, input.batch);
    for i in (0..cfg.n_layer).rev() {
        let states = LayerStates {
            conv_init: state.map(|s| s.conv_layer(i)),
            ssm_init: state.map(|s| s.ssm_layer(i)),
            d_conv_last: d_final.map(|s| s.conv_layer(i)),
            d_ssm_last: d_final.map(|s| s.ssm_layer(i)),
        };
        let (lp, lc, gl) = (&params.layers[i], &cache.layers[i], &mut grads.layers[i]);
        let (d_in, d_conv, d_ssm) =
            pool.install(|| layer_bwd(pool, cfg, lp, lc, input, states, &d_resid, gl));
        done(ParamGroup::Layer(i), grads)?;
        for (g, d) in d_resid.iter_mut().zip(&d_in) {
            *g += *d;
        }
        d_state.conv_layer_mut(i).copy_from_slice(&d_conv);
        d_state.ssm_layer_mut(i).copy_from_slice(&d_ssm);
    }
    embed_bwd(cfg, input, &d_resid, &mut grads.embeddings.data);
    done(ParamGroup::Outer, grads)?;
    Ok(d_state)
}

/// The shapes [`backward_final`] checks before it starts.
pub(crate) fn check(
    cfg: &MambaConfig,
    input: &Batch,
    state: Option<&State<f32>>,
    cache: &ForwardCache<f32>,
    d_logits: &[f32],
    d_final: Option<&State<f32>>,
) -> Result<()> {
    input.check(cfg, "simd backward")?;
    if let Some(s) = d_final {
        s.check(cfg, input.batch, "simd backward (final-state gradient)")?;
    }
    if let Some(s) = state {
        s.check(cfg, input.batch, "simd backward")?;
    }
    let (n, dm, v) = (input.rows(), cfg.d_model, cfg.vocab_size);
    if d_logits.len() != n * v {
        return Err(Error::Shape {
            op: "simd backward",
            msg: format!(
                "d_logits has {} values, expected [batch, seq_len, vocab] = [{}, {}, {}]",
                d_logits.len(),
                input.batch,
                input.seq_len,
                v
            ),
        });
    }
    if cache.layers.len() != cfg.n_layer || cache.hf.len() != n * dm {
        return Err(Error::Shape {
            op: "simd backward",
            msg: format!(
                "cache has {} layers and {} norm_f outputs, expected n_layer = {} and [batch * seq_len, d_model] = [{n}, {dm}]",
                cache.layers.len(),
                cache.hf.len(),
                cfg.n_layer
            ),
        });
    }
    Ok(())
}

/// The lm_head's and the final norm's backward from `d_logits`: adds their gradients to
/// `grads` (only its outer tensors are touched; `params`' layers are not read) and returns
/// the gradient w.r.t. the residual stream after the last layer.
pub(crate) fn head_bwd(
    pool: &ThreadPool,
    cfg: &MambaConfig,
    params: &Params<f32>,
    cache: &ForwardCache<f32>,
    d_logits: &[f32],
    n: usize,
    grads: &mut Params<f32>,
) -> Vec<f32> {
    let (dm, v) = (cfg.d_model, cfg.vocab_size);
    let head = match grads.lm_head.as_mut() {
        Some(t) => &mut t.data,
        None => &mut grads.embeddings.data,
    };
    let d_hf = linear_bwd(
        pool,
        &cache.hf,
        &params.lm_head_weight().data,
        d_logits,
        n,
        dm,
        v,
        head,
        None,
    );
    norm_bwd(
        pool,
        cfg.norm,
        &cache.resid_final,
        &params.norm_f_weight.data,
        &cache.norm_f_stats,
        &d_hf,
        n,
        dm,
        &mut grads.norm_f_weight.data,
        grads.norm_f_bias.as_mut().map(|t| &mut t.data[..]),
    )
}

/// The embedding lookup's backward: adds each position's `d_resid` row to its token's row
/// of `g_embed`.
pub(crate) fn embed_bwd(cfg: &MambaConfig, input: &Batch, d_resid: &[f32], g_embed: &mut [f32]) {
    let dm = cfg.d_model;
    for (i, &tok) in input.tokens.iter().enumerate() {
        let row = &mut g_embed[tok as usize * dm..(tok as usize + 1) * dm];
        for (g, d) in row.iter_mut().zip(&d_resid[i * dm..(i + 1) * dm]) {
            *g += *d;
        }
    }
}
