//! The forward over a batch of sequences, the prefill and the one-token decode step, on the
//! current rayon pool. Activations live in a reusable [`Scratch`], so a decode step allocates
//! nothing once the buffers have grown to the batch size. With `keep`, it also returns the
//! `reference::model::ForwardCache` the backward consumes.

use reference::model::{Batch, ForwardCache, LayerCache};
use reference::ops::norm::NormStats;
use reference::{MambaConfig, State};

use crate::kernels::{Isa, MatRef};
use crate::model::{LayerWeights, Weights};
use crate::ops::conv1d::{conv1d_fwd, conv1d_step_silu};
use crate::ops::linear::linear;
use crate::ops::norm::norm_fwd;
use crate::ops::selective_scan::{selective_scan_fwd, Scan};
use crate::vecmath::silu_into;
use crate::weights::dequant_rows;

/// Reusable activation buffers.
#[derive(Debug, Default)]
pub struct Scratch {
    resid: Vec<f32>,
    hn: Vec<f32>,
    x: Vec<f32>,
    z: Vec<f32>,
    u: Vec<f32>,
    xs: Vec<f32>,
    dtr: Vec<f32>,
    bm: Vec<f32>,
    cm: Vec<f32>,
    delta: Vec<f32>,
    gated: Vec<f32>,
    out: Vec<f32>,
    conv_init: Vec<f32>,
    /// in_proj's and x_proj's full outputs before their columns are split (one buffer each,
    /// so that neither changes size from layer to layer).
    wide: Vec<f32>,
    wide_x: Vec<f32>,
    last_rows: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

/// Sets `v` to `n` values. Every caller overwrites all of them, so a buffer that already
/// has `n` keeps its (stale) contents: only a change of size writes (zeros). Zero-filling
/// every buffer of every layer cost a 130M f32 prefill of 512 tokens about 450 MB of memset.
fn fit(v: &mut Vec<f32>, n: usize) {
    if v.len() != n {
        v.clear();
        v.resize(n, 0.0);
    }
}

/// Splits rows of `[a | b]` (each `w` wide) into `a` and `b`.
fn split2(src: &[f32], w: usize, a: &mut [f32], b: &mut [f32]) {
    for (row, s) in src.chunks(2 * w).enumerate() {
        a[row * w..(row + 1) * w].copy_from_slice(&s[..w]);
        b[row * w..(row + 1) * w].copy_from_slice(&s[w..]);
    }
}

/// Which logits to compute.
pub enum Logits<'a> {
    /// Every position: `[batch, seq_len, vocab]`.
    All(&'a mut Vec<f32>),
    /// The last position of each row: `[batch, vocab]`.
    Last(&'a mut [f32]),
}

fn stats(s: &Scratch) -> NormStats<f32> {
    NormStats {
        mean: s.mean.clone(),
        rstd: s.rstd.clone(),
    }
}

/// Sizes the buffers of one layer for `n` rows; `dims` = `(d_model, d_inner, d_state,
/// dt_rank)`.
fn fit_layer(s: &mut Scratch, n: usize, (dm, di, ds, r): (usize, usize, usize, usize)) {
    for (v, len) in [(&mut s.hn, n * dm), (&mut s.out, n * dm)] {
        fit(v, len);
    }
    for v in [
        &mut s.x,
        &mut s.z,
        &mut s.u,
        &mut s.xs,
        &mut s.delta,
        &mut s.gated,
    ] {
        fit(v, n * di);
    }
    fit(&mut s.dtr, n * r);
    fit(&mut s.bm, n * ds);
    fit(&mut s.cm, n * ds);
    fit(&mut s.mean, n);
    fit(&mut s.rstd, n);
}

/// The conv of layer `i` over `s.x` into `s.u` and its silu into `s.xs`: the one-token update
/// for a sequence of one, else the forward from the state's window; either leaves the window
/// after the last position in `state`. `dims` = `(d_inner, d_conv)`.
fn conv(
    lw: &LayerWeights,
    input: &Batch,
    i: usize,
    state: &mut State<f32>,
    s: &mut Scratch,
    (di, dc): (usize, usize),
) {
    let cb = lw.conv_b.as_deref();
    if input.seq_len == 1 {
        let win = state.conv_layer_mut(i);
        conv1d_step_silu(
            &s.x,
            &lw.conv_w,
            cb,
            input.resets,
            win,
            (input.batch, di, dc),
            &mut s.u,
            &mut s.xs,
        );
    } else {
        s.conv_init.clear();
        s.conv_init.extend_from_slice(state.conv_layer(i));
        let dims = (input.batch, input.seq_len, di, dc);
        let last = state.conv_layer_mut(i);
        conv1d_fwd(
            &s.x,
            &lw.conv_w,
            cb,
            input.resets,
            Some(&s.conv_init),
            dims,
            &mut s.u,
            last,
        );
        silu_into(&s.u, &mut s.xs);
    }
}

/// What the backward needs of one layer's forward.
fn layer_cache(s: &Scratch, lw: &LayerWeights) -> LayerCache<f32> {
    LayerCache {
        resid_in: s.resid.clone(),
        norm_stats: stats(s),
        hn: s.hn.clone(),
        x_pre: s.x.clone(),
        z: s.z.clone(),
        u: s.u.clone(),
        xs: s.xs.clone(),
        dt_raw: s.dtr.clone(),
        b: s.bm.clone(),
        c: s.cm.clone(),
        delta: s.delta.clone(),
        a: lw.a.clone(),
        gated: s.gated.clone(),
    }
}

#[allow(clippy::too_many_arguments)]
/// One residual block: adds the mixer's output to `s.resid` and advances layer `i` of `state`.
pub(crate) fn layer(
    isa: Isa,
    cfg: &MambaConfig,
    lw: &LayerWeights,
    input: &Batch,
    i: usize,
    state: &mut State<f32>,
    s: &mut Scratch,
    keep: bool,
) -> Option<LayerCache<f32>> {
    let n = input.rows();
    let (dm, di, ds, r, dc) = (
        cfg.d_model,
        cfg.d_inner,
        cfg.d_state,
        cfg.dt_rank,
        cfg.d_conv,
    );
    fit_layer(s, n, (dm, di, ds, r));
    let nb = lw.norm_b.as_deref();
    norm_fwd(
        cfg.norm,
        &s.resid,
        &lw.norm_w,
        nb,
        cfg.norm_eps,
        dm,
        &mut s.hn,
        &mut s.mean,
        &mut s.rstd,
    );
    // One product per weight matrix (one pass over its bytes), then split the columns.
    fit(&mut s.wide, n * 2 * di);
    linear(
        isa,
        lw.in_proj.view(),
        &s.hn,
        lw.in_proj_b.as_deref(),
        dm,
        &mut s.wide,
    );
    split2(&s.wide, di, &mut s.x, &mut s.z);
    conv(lw, input, i, state, s, (di, dc));
    let xw = r + 2 * ds;
    fit(&mut s.wide_x, n * xw);
    linear(isa, lw.x_proj.view(), &s.xs, None, di, &mut s.wide_x);
    for (row, src) in s.wide_x.chunks(xw).enumerate() {
        s.dtr[row * r..(row + 1) * r].copy_from_slice(&src[..r]);
        s.bm[row * ds..(row + 1) * ds].copy_from_slice(&src[r..r + ds]);
        s.cm[row * ds..(row + 1) * ds].copy_from_slice(&src[r + ds..]);
    }
    linear(isa, lw.dt_proj.view(), &s.dtr, None, r, &mut s.delta);
    let scan = Scan {
        u: &s.xs,
        delta: &s.delta,
        a: &lw.a,
        b: &s.bm,
        c: &s.cm,
        d: &lw.d,
        z: &s.z,
        delta_bias: &lw.dt_b,
        resets: input.resets,
        batch: input.batch,
        seq_len: input.seq_len,
        d_inner: di,
        d_state: ds,
    };
    selective_scan_fwd(isa, &scan, state.ssm_layer_mut(i), &mut s.gated);
    linear(
        isa,
        lw.out_proj.view(),
        &s.gated,
        lw.out_b.as_deref(),
        di,
        &mut s.out,
    );
    let cache = keep.then(|| layer_cache(s, lw));
    for (v, o) in s.resid.iter_mut().zip(&s.out) {
        *v += *o;
    }
    cache
}

/// Runs `input` from `state` (the initial state; zeros for none), leaving the final state in
/// it, and writes the requested logits. Checks the batch against `cfg`.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    isa: Isa,
    cfg: &MambaConfig,
    w: &Weights,
    input: &Batch,
    state: &mut State<f32>,
    s: &mut Scratch,
    logits: Logits,
    keep: bool,
) -> reference::Result<Option<ForwardCache<f32>>> {
    input.check(cfg, "simd forward")?;
    state.check(cfg, input.batch, "simd forward")?;
    embed(cfg, w.embed.view(), input, s);
    let rest = move || {
        let mut layers = Vec::new();
        for (i, lw) in w.layers.iter().enumerate() {
            if let Some(c) = layer(isa, cfg, lw, input, i, state, s, keep) {
                layers.push(c);
            }
        }
        let fb = w.norm_f_b.as_deref();
        head(
            isa,
            cfg,
            (&w.norm_f_w, fb),
            w.head().view(),
            input,
            s,
            logits,
        )?;
        Ok(keep.then(|| final_cache(s, layers)))
    };
    if input.seq_len == 1 && !keep {
        // A decode step: dozens of short parallel regions, on a spinning team (crate::team).
        crate::team::with_team(rest)
    } else {
        rest()
    }
}

/// The embedding rows of `input`'s tokens into the residual stream `s.resid`.
pub(crate) fn embed(cfg: &MambaConfig, emb: MatRef, input: &Batch, s: &mut Scratch) {
    let dm = cfg.d_model;
    fit(&mut s.resid, input.rows() * dm);
    for (t, &tok) in input.tokens.iter().enumerate() {
        dequant_rows(emb, dm, tok as usize, &mut s.resid[t * dm..(t + 1) * dm]);
    }
}

/// The final norm of `s.resid` (into `s.hn`, its statistics kept in the scratch) and the
/// logits from `head`; `norm_f` = (weight, bias).
pub(crate) fn head(
    isa: Isa,
    cfg: &MambaConfig,
    (norm_w, norm_b): (&[f32], Option<&[f32]>),
    head: MatRef,
    input: &Batch,
    s: &mut Scratch,
    logits: Logits,
) -> reference::Result<()> {
    let (n, dm, vocab) = (input.rows(), cfg.d_model, cfg.vocab_size);
    fit(&mut s.hn, n * dm);
    fit(&mut s.mean, n);
    fit(&mut s.rstd, n);
    norm_fwd(
        cfg.norm,
        &s.resid,
        norm_w,
        norm_b,
        cfg.norm_eps,
        dm,
        &mut s.hn,
        &mut s.mean,
        &mut s.rstd,
    );
    match logits {
        Logits::All(out) => {
            fit(out, n * vocab);
            linear(isa, head, &s.hn, None, dm, out);
        }
        Logits::Last(out) => {
            let (b, l) = (input.batch, input.seq_len);
            reference::engine::check_len("simd forward", "logits", out.len(), b * vocab)?;
            fit(&mut s.last_rows, b * dm);
            for bi in 0..b {
                let src = (bi * l + l - 1) * dm;
                s.last_rows[bi * dm..(bi + 1) * dm].copy_from_slice(&s.hn[src..src + dm]);
            }
            linear(isa, head, &s.last_rows, None, dm, out);
        }
    }
    Ok(())
}

/// The backward's cache: the layers' and what [`head`] left in the scratch.
pub(crate) fn final_cache(s: &Scratch, layers: Vec<LayerCache<f32>>) -> ForwardCache<f32> {
    ForwardCache {
        layers,
        resid_final: s.resid.clone(),
        norm_f_stats: stats(s),
        hf: s.hn.clone(),
    }
}
