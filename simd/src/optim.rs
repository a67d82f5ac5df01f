//! AdamW with global-norm clipping over `Params<f32>`, in parallel over blocks of every
//! tensor: the fast twin of `reference::optim::AdamW::step`.
//!
//! The per-element update is the reference's, operation for operation (Rust never fuses a
//! multiply-add and `sqrt` is correctly rounded), so parameters and moments come out the same
//! bits. The gradient norm sums squares in f64 per block and the blocks in canonical order, so
//! it may differ from the reference's in the last f64 bits; it never depends on the thread
//! count.

use rayon::prelude::*;
use rayon::ThreadPool;
use reference::optim::{AdamW, AdamWConfig, StepStats};
use reference::params::{is_no_decay, param_specs};
use reference::{MambaConfig, Params};

/// Elements per task.
const BLOCK: usize = 1 << 14;

/// Global L2 norm of every gradient, in f64.
pub fn grad_norm(pool: &ThreadPool, grads: &Params<f32>) -> f64 {
    let blocks: Vec<&[f32]> = grads
        .tensors()
        .into_iter()
        .flat_map(|t| t.data.chunks(BLOCK))
        .collect();
    let sums: Vec<f64> = pool.install(|| {
        blocks
            .par_iter()
            .map(|b| {
                b.iter()
                    .map(|&g| {
                        let g = f64::from(g);
                        g * g
                    })
                    .sum::<f64>()
            })
            .collect()
    });
    sums.iter().sum::<f64>().sqrt()
}

/// One block of one tensor: parameters, gradients, both moments, and whether it decays.
type Block<'a> = (&'a mut [f32], &'a [f32], &'a mut [f32], &'a mut [f32], bool);

/// Clips `grads` to `hp.max_grad_norm` (coefficient `max / (norm + 1e-6)` when below 1) and
/// applies one AdamW update with learning rate `lr` to `params` and `opt`, exactly as
/// `reference::optim::AdamW::step`. A non-finite gradient norm skips the step: nothing is
/// updated and `opt.step` does not move.
pub fn adamw_step(
    pool: &ThreadPool,
    cfg: &MambaConfig,
    opt: &mut AdamW<f32>,
    params: &mut Params<f32>,
    grads: &mut Params<f32>,
    hp: &AdamWConfig,
    lr: f64,
) -> StepStats {
    let norm = grad_norm(pool, grads);
    if !norm.is_finite() {
        return StepStats {
            grad_norm: norm,
            clipped: false,
            skipped: true,
        };
    }
    let clip = hp.clip_coef(norm);
    if let Some(coef) = clip {
        let c = coef as f32;
        let mut blocks: Vec<&mut [f32]> = grads
            .tensors_mut()
            .into_iter()
            .flat_map(|t| t.data.chunks_mut(BLOCK))
            .collect();
        pool.install(|| {
            blocks
                .par_iter_mut()
                .for_each(|b| b.iter_mut().for_each(|g| *g *= c))
        });
    }
    let clipped = clip.is_some();
    opt.step += 1;
    let k = Coefs::new(hp, lr, opt.step);
    let specs = param_specs(cfg);
    let mut blocks: Vec<Block> = Vec::new();
    let ps = params.tensors_mut();
    let gs = grads.tensors();
    let ms = opt.m.tensors_mut();
    let vs = opt.v.tensors_mut();
    for ((((p, g), m), v), (name, _)) in ps.into_iter().zip(gs).zip(ms).zip(vs).zip(&specs) {
        let decays = hp.weight_decay != 0.0 && !is_no_decay(name);
        for (((p, g), m), v) in p
            .data
            .chunks_mut(BLOCK)
            .zip(g.data.chunks(BLOCK))
            .zip(m.data.chunks_mut(BLOCK))
            .zip(v.data.chunks_mut(BLOCK))
        {
            blocks.push((p, g, m, v, decays));
        }
    }
    pool.install(|| {
        blocks
            .into_par_iter()
            .for_each(|(p, g, m, v, decays)| update(&k, p, g, m, v, decays))
    });
    StepStats {
        grad_norm: norm,
        clipped,
        skipped: false,
    }
}

/// The step's constants, rounded to f32 as the reference rounds them.
struct Coefs {
    step_size: f32,
    sqrt_bc2: f32,
    b1: f32,
    b2: f32,
    omb1: f32,
    omb2: f32,
    eps: f32,
    decay: f32,
}

impl Coefs {
    /// The constants of step `step` (1-based, already counted).
    fn new(hp: &AdamWConfig, lr: f64, step: u64) -> Coefs {
        let t = step as f64;
        let bc1 = 1.0 - libm::pow(hp.beta1, t);
        let bc2 = 1.0 - libm::pow(hp.beta2, t);
        Coefs {
            step_size: (lr / bc1) as f32,
            sqrt_bc2: bc2.sqrt() as f32,
            b1: hp.beta1 as f32,
            b2: hp.beta2 as f32,
            omb1: (1.0 - hp.beta1) as f32,
            omb2: (1.0 - hp.beta2) as f32,
            eps: hp.eps as f32,
            decay: (1.0 - lr * hp.weight_decay) as f32,
        }
    }
}

/// The AdamW update of step `step` (1-based: the caller has counted it) over flat slices,
/// for a sharded optimizer that owns a slice of the parameters laid end to end: `runs` are
/// ranges of the slices and whether they decay (elements outside every run, the padding, are
/// left alone). Gradients are already clipped. Per element this is [`adamw_step`]'s update,
/// so the bits are the same.
#[allow(clippy::too_many_arguments)]
pub fn adamw_update_flat(
    pool: &ThreadPool,
    hp: &AdamWConfig,
    lr: f64,
    step: u64,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    runs: &[(std::ops::Range<usize>, bool)],
) {
    let k = Coefs::new(hp, lr, step);
    let mut blocks: Vec<Block> = Vec::new();
    let (ps, ms, vs) = (carve(p, runs), carve(m, runs), carve(v, runs));
    for (((p, m), v), (r, decays)) in ps.into_iter().zip(ms).zip(vs).zip(runs) {
        let decays = hp.weight_decay != 0.0 && *decays;
        for (((p, g), m), v) in p
            .chunks_mut(BLOCK)
            .zip(g[r.clone()].chunks(BLOCK))
            .zip(m.chunks_mut(BLOCK))
            .zip(v.chunks_mut(BLOCK))
        {
            blocks.push((p, g, m, v, decays));
        }
    }
    pool.install(|| {
        blocks
            .into_par_iter()
            .for_each(|(p, g, m, v, decays)| update(&k, p, g, m, v, decays))
    });
}

/// The disjoint, increasing `runs` of `s` as separate mutable slices.
fn carve<'a>(mut s: &'a mut [f32], runs: &[(std::ops::Range<usize>, bool)]) -> Vec<&'a mut [f32]> {
    let mut at = 0;
    let mut out = Vec::with_capacity(runs.len());
    for (r, _) in runs {
        let (_, tail) = std::mem::take(&mut s).split_at_mut(r.start - at);
        let (mine, tail) = tail.split_at_mut(r.len());
        out.push(mine);
        s = tail;
        at = r.end;
    }
    out
}

/// The reference's per-element update over one block.
fn update(k: &Coefs, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], decays: bool) {
    for i in 0..p.len() {
        let gi = g[i];
        if decays {
            p[i] *= k.decay;
        }
        m[i] = k.b1 * m[i] + k.omb1 * gi;
        v[i] = k.b2 * v[i] + k.omb2 * (gi * gi);
        let denom = v[i].sqrt() / k.sqrt_bc2 + k.eps;
        p[i] -= k.step_size * (m[i] / denom);
    }
}
