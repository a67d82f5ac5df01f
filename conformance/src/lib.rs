//! Shared helpers for the conformance tests: seeded random configs, parameters, inputs and
//! states drawn from the distributions the model sees, and comparisons that report the worst
//! element.
//!
//! Every random input comes from a seed derived from the test case's name; nothing is zeros.

pub mod goldens;
pub mod gpu_ops;
pub mod shape;
pub mod tol;
pub mod zero;

use reference::rng::{fnv1a64, Rng};
use reference::{Float, MambaConfig, NormKind, Params, State, Tensor};

/// A pool of `threads` threads, for the tiers that run on one (`simd`).
pub fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

/// Seed for a named case.
pub fn seed_of(name: &str) -> u64 {
    fnv1a64(name)
}

/// Shape knobs of a small test model.
#[derive(Clone, Debug)]
pub struct SmallModel {
    pub d_model: usize,
    pub n_layer: usize,
    pub vocab: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub expand: usize,
    pub norm: NormKind,
    pub tied: bool,
    pub bias: bool,
    pub conv_bias: bool,
}

impl SmallModel {
    pub fn config(&self) -> MambaConfig {
        let mut c = MambaConfig::new(self.d_model, self.n_layer, self.vocab);
        c.d_state = self.d_state;
        c.d_conv = self.d_conv;
        c.expand = self.expand;
        c.d_inner = self.expand * self.d_model;
        c.norm = self.norm;
        c.tie_embeddings = self.tied;
        c.use_bias = self.bias;
        c.conv_bias = self.conv_bias;
        c
    }
}

impl Default for SmallModel {
    fn default() -> Self {
        SmallModel {
            d_model: 6,
            n_layer: 2,
            vocab: 11,
            d_state: 3,
            d_conv: 4,
            expand: 2,
            norm: NormKind::Rms,
            tied: true,
            bias: false,
            conv_bias: true,
        }
    }
}

/// The from-scratch init, then every tensor moved by N(0, 0.1²) noise, so norm weights, biases,
/// `D` and `A_log` are not at their round init values and every gradient path is exercised.
/// `dt_proj.bias` is redrawn from N(0, 1), so dt (softplus of it) is 0.3–1.3 as in a trained
/// model rather than the tiny init values, whose gradients sit at the finite-difference noise
/// floor.
pub fn random_params<T: Float>(cfg: &MambaConfig, seed: u64) -> Params<T> {
    let mut p: Params<f64> = reference::init::init_params(cfg, seed);
    let mut rng = Rng::new(seed ^ 0x5eed);
    for t in p.tensors_mut() {
        for v in &mut t.data {
            *v += 0.1 * rng.normal();
        }
    }
    for l in &mut p.layers {
        for v in &mut l.dt_proj_bias.data {
            *v = rng.normal();
        }
    }
    p.cast(cfg)
}

/// Token ids uniform in the vocabulary, `[batch, seq_len]`.
pub fn random_tokens(rng: &mut Rng, cfg: &MambaConfig, n: usize) -> Vec<u32> {
    (0..n)
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect()
}

/// Reset flags with probability `p` per position.
pub fn random_flags(rng: &mut Rng, n: usize, p: f64) -> Vec<bool> {
    (0..n).map(|_| rng.next_f64() < p).collect()
}

/// A state of N(0, 0.5²) values, as after a few tokens.
pub fn random_state<T: Float>(rng: &mut Rng, cfg: &MambaConfig, batch: usize) -> State<T> {
    let mut s = State::<T>::zeros(cfg, batch);
    for v in s.conv.data.iter_mut().chain(s.ssm.data.iter_mut()) {
        *v = T::from_f64(0.5 * rng.normal());
    }
    s
}

/// Worst element of `got` against `want`.
#[derive(Clone, Debug)]
pub struct Diff {
    /// ‖got − want‖ / ‖want‖ (absolute when ‖want‖ = 0).
    pub rel: f64,
    pub max_abs: f64,
    pub worst_index: usize,
    pub got: f64,
    pub want: f64,
    pub has_nan: bool,
}

/// Compares two buffers; NaN anywhere is reported in `has_nan`.
pub fn diff<A: Float, B: Float>(got: &[A], want: &[B]) -> Diff {
    assert_eq!(got.len(), want.len(), "diff: lengths differ");
    let (mut num, mut den, mut max_abs, mut worst) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    let mut has_nan = false;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.to_f64(), w.to_f64());
        has_nan |= g.is_nan() || w.is_nan();
        let d = (g - w).abs();
        num += d * d;
        den += w * w;
        if d > max_abs {
            max_abs = d;
            worst = i;
        }
    }
    let rel = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    Diff {
        rel,
        max_abs,
        worst_index: worst,
        got: got.get(worst).map_or(0.0, |v| v.to_f64()),
        want: want.get(worst).map_or(0.0, |v| v.to_f64()),
        has_nan,
    }
}

/// Asserts `‖got − want‖ / ‖want‖ <= tol`, naming the tensor, its shape and the worst element.
pub fn assert_close<A: Float, B: Float>(
    what: &str,
    shape: &[usize],
    got: &[A],
    want: &[B],
    tol: f64,
) {
    let d = diff(got, want);
    let coords = unravel(d.worst_index, shape);
    assert!(
        !d.has_nan && d.rel <= tol,
        "{what} {shape:?}: relative error {:.3e} > {tol:.1e} (NaN: {}); worst at {coords:?}: got {} want {}",
        d.rel,
        d.has_nan,
        d.got,
        d.want
    );
}

/// Asserts `‖got − want‖ <= tol · ‖want‖ + floor · sqrt(n)`: a relative limit with an absolute
/// noise floor per element, for references that are themselves noisy (finite differences).
pub fn assert_close_floor<A: Float, B: Float>(
    what: &str,
    shape: &[usize],
    got: &[A],
    want: &[B],
    tol: f64,
    floor: f64,
) {
    let d = diff(got, want);
    let norm_want = want
        .iter()
        .map(|w| w.to_f64() * w.to_f64())
        .sum::<f64>()
        .sqrt();
    let err = d.rel * if norm_want > 0.0 { norm_want } else { 1.0 };
    let limit = tol * norm_want + floor * (want.len() as f64).sqrt();
    let coords = unravel(d.worst_index, shape);
    assert!(
        !d.has_nan && err <= limit,
        "{what} {shape:?}: error {err:.3e} > limit {limit:.3e} (relative {:.3e}, NaN: {}); worst at {coords:?}: got {} want {}",
        d.rel,
        d.has_nan,
        d.got,
        d.want
    );
}

/// Flat index to coordinates.
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut out = vec![0; shape.len()];
    for (k, &s) in shape.iter().enumerate().rev() {
        if s > 0 {
            out[k] = i % s;
            i /= s;
        }
    }
    out
}

/// Bit patterns of an f32 tensor, for byte-for-byte comparisons.
pub fn bits(t: &Tensor<f32>) -> Vec<u32> {
    t.data.iter().map(|v| v.to_bits()).collect()
}

/// Random small models for property tests: widths from the given ranges, 1–2 layers, `d_conv`
/// 1–4, either norm, tied or untied, biases on or off.
pub fn small_models(
    d_model: std::ops::Range<usize>,
    vocab: std::ops::Range<usize>,
    d_state: std::ops::Range<usize>,
    expand: std::ops::Range<usize>,
) -> impl proptest::strategy::Strategy<Value = SmallModel> {
    use proptest::prelude::*;
    (
        d_model,
        1usize..3,
        vocab,
        d_state,
        1usize..5,
        expand,
        any::<[bool; 4]>(),
    )
        .prop_map(
            |(d_model, n_layer, vocab, d_state, d_conv, expand, f)| SmallModel {
                d_model,
                n_layer,
                vocab,
                d_state,
                d_conv,
                expand,
                norm: if f[0] { NormKind::Rms } else { NormKind::Layer },
                tied: f[1],
                bias: f[2],
                conv_bias: f[3],
            },
        )
}

/// `rows` rows of `len` token ids of the bundled corpus's validation text (its last 5 %, as
/// the quickstart's `--val-fraction 0.05` holds out), encoded with `tokenizer`.
pub fn validation_tokens(
    tokenizer: &std::path::Path,
    vocab: usize,
    rows: usize,
    len: usize,
) -> Vec<Vec<u32>> {
    let tok = trainer::tokenizer::load(tokenizer, vocab).unwrap();
    let text = std::fs::read_to_string(fixtures::corpus()).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let held = &lines[lines.len() - lines.len().div_ceil(20)..];
    let mut ids = Vec::new();
    for l in held {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let t = v["text"].as_str().unwrap_or_default();
        ids.extend(tok.encode(t, false).unwrap().get_ids().iter().copied());
        if ids.len() >= rows * len {
            break;
        }
    }
    assert!(ids.len() > len, "validation text too short: {}", ids.len());
    ids.chunks_exact(len)
        .take(rows)
        .map(<[u32]>::to_vec)
        .collect()
}
