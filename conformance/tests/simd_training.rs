//! The simd tier's backward against the f32 reference: every parameter gradient and the
//! initial state's. (Its loss and AdamW are checked in `loss.rs` and `adamw.rs`.)
//!
//! Each backward case runs the *reference* forward (with its cache), so these tests do not
//! depend on the simd forward. Cases cover odd widths (d_model 1, 3, 5, 17; odd d_inner;
//! d_state 1 to 17; dt_rank 1 to 5), seq_len 1 and 300, batch 1 to 3, resets, initial states,
//! tied and untied heads, RMSNorm and LayerNorm, biases on and off, and pools of 1 and 2
//! threads (the same bits for both, and from run to run).

use conformance::shape::{base, Shape};
use conformance::tol::{SIMD_BACKWARD_F32, SIMD_BACKWARD_STATE_F32};
use conformance::{
    assert_close, diff, pool, random_flags, random_params, random_state, random_tokens,
};
use proptest::prelude::*;
use rayon::ThreadPool;
use reference::loss::{cross_entropy, next_token_targets};
use reference::model::{backward, forward, Batch, ForwardCache};
use reference::rng::Rng;
use reference::{param_specs, MambaConfig, NormKind, Params, State};

struct Case {
    cfg: MambaConfig,
    params: Params<f32>,
    tokens: Vec<u32>,
    resets: Option<Vec<bool>>,
    targets: Vec<u32>,
    mask: Vec<bool>,
    state: Option<State<f32>>,
    batch: usize,
    seq_len: usize,
}

impl Case {
    fn new(name: &str, s: &Shape) -> Case {
        let cfg = s.config();
        let seed = conformance::seed_of(name);
        let mut rng = Rng::new(seed);
        let n = s.batch * s.seq_len;
        let tokens = random_tokens(&mut rng, &cfg, n);
        let (targets, mut mask) = next_token_targets(&tokens, s.batch, s.seq_len);
        for (m, k) in mask.iter_mut().zip(random_flags(&mut rng, n, 0.8)) {
            *m &= k;
        }
        if s.seq_len == 1 {
            // Every position would lack a target: count them all so a gradient flows.
            mask.iter_mut().for_each(|m| *m = true);
        }
        let resets = s.resets.then(|| {
            let mut r = random_flags(&mut rng, n, 0.1);
            if s.seq_len > 3 {
                r[s.seq_len / 2] = true; // at least one reset mid-row
            }
            r
        });
        let state = s.state.then(|| random_state(&mut rng, &cfg, s.batch));
        Case {
            params: random_params(&cfg, seed),
            cfg,
            tokens,
            resets,
            targets,
            mask,
            state,
            batch: s.batch,
            seq_len: s.seq_len,
        }
    }

    fn batch(&self) -> Batch<'_> {
        Batch {
            batch: self.batch,
            seq_len: self.seq_len,
            tokens: &self.tokens,
            resets: self.resets.as_deref(),
        }
    }

    /// Reference forward (with cache) and the loss gradient.
    fn forward(&self) -> (ForwardCache<f32>, Vec<f32>) {
        let (logits, _, cache) = forward(
            &self.cfg,
            &self.params,
            &self.batch(),
            self.state.as_ref(),
            true,
        )
        .expect("reference forward");
        let lo = cross_entropy(
            &logits.data,
            &self.targets,
            Some(&self.mask),
            self.cfg.vocab_size,
            1.0,
        )
        .expect("reference loss");
        (cache.expect("cache kept"), lo.d_logits)
    }

    fn reference(&self, cache: &ForwardCache<f32>, d_logits: &[f32]) -> (Params<f32>, State<f32>) {
        let mut g = Params::zeros(&self.cfg);
        let gs = backward(
            &self.cfg,
            &self.params,
            &self.batch(),
            self.state.as_ref(),
            cache,
            d_logits,
            &mut g,
        )
        .expect("reference backward");
        (g, gs)
    }

    fn simd(
        &self,
        pool: &ThreadPool,
        cache: &ForwardCache<f32>,
        d_logits: &[f32],
    ) -> (Params<f32>, State<f32>) {
        let mut g = Params::zeros(&self.cfg);
        let gs = simd::backward::backward(
            pool,
            &self.cfg,
            &self.params,
            &self.batch(),
            self.state.as_ref(),
            cache,
            d_logits,
            &mut g,
        )
        .expect("simd backward");
        (g, gs)
    }
}

fn all_bits(p: &Params<f32>, s: &State<f32>) -> Vec<u32> {
    p.tensors()
        .into_iter()
        .chain([&s.conv, &s.ssm])
        .flat_map(|t| t.data.iter().map(|v| v.to_bits()))
        .collect()
}

/// Asserts every gradient within tolerance; returns the worst relative errors (params, state).
fn compare(
    name: &str,
    cfg: &MambaConfig,
    got: &(Params<f32>, State<f32>),
    want: &(Params<f32>, State<f32>),
) -> (f64, f64) {
    let mut worst = (0.0f64, 0.0f64);
    for (((pname, shape), g), w) in param_specs(cfg)
        .iter()
        .zip(got.0.tensors())
        .zip(want.0.tensors())
    {
        worst.0 = worst.0.max(diff(&g.data, &w.data).rel);
        assert_close(
            &format!("{name}: grad {pname}"),
            shape,
            &g.data,
            &w.data,
            SIMD_BACKWARD_F32,
        );
    }
    for (which, g, w) in [
        ("conv", &got.1.conv, &want.1.conv),
        ("ssm", &got.1.ssm, &want.1.ssm),
    ] {
        worst.1 = worst.1.max(diff(&g.data, &w.data).rel);
        assert_close(
            &format!("{name}: grad initial {which} state"),
            &g.shape,
            &g.data,
            &w.data,
            SIMD_BACKWARD_STATE_F32,
        );
    }
    worst
}

/// Backward at 1 and 2 threads against the reference; the two pools and a repeat give the
/// same bits.
fn check_backward(name: &str, s: &Shape) -> (f64, f64) {
    let case = Case::new(name, s);
    let (cache, d_logits) = case.forward();
    let want = case.reference(&cache, &d_logits);
    let p1 = pool(1);
    let p2 = pool(2);
    let got1 = case.simd(&p1, &cache, &d_logits);
    let got2 = case.simd(&p2, &cache, &d_logits);
    let again = case.simd(&p2, &cache, &d_logits);
    let worst = compare(name, &case.cfg, &got2, &want);
    assert_eq!(
        all_bits(&got2.0, &got2.1),
        all_bits(&again.0, &again.1),
        "{name}: two runs on 2 threads differ"
    );
    assert_eq!(
        all_bits(&got1.0, &got1.1),
        all_bits(&got2.0, &got2.1),
        "{name}: 1 and 2 threads differ"
    );
    println!(
        "{name}: worst relative error params {:.3e}, state {:.3e}",
        worst.0, worst.1
    );
    worst
}

/// Named shapes, one knob at a time varied from [`base`].
fn shape_table() -> Vec<(&'static str, Shape)> {
    let b = base();
    vec![
        ("base_rms_tied", b.clone()),
        (
            "d_model_1",
            Shape {
                d_model: 1,
                expand: 2,
                dt_rank: 1,
                ..b.clone()
            },
        ),
        (
            "d_model_3_layernorm_untied",
            Shape {
                d_model: 3,
                norm: NormKind::Layer,
                tied: false,
                ..b.clone()
            },
        ),
        (
            "d_model_17_bias_d_state_17",
            Shape {
                d_model: 17,
                expand: 1,
                d_state: 17,
                dt_rank: 5,
                bias: true,
                ..b.clone()
            },
        ),
        (
            "d_state_1_no_conv_bias",
            Shape {
                d_state: 1,
                conv_bias: false,
                ..b.clone()
            },
        ),
        (
            "d_conv_2_layernorm_bias",
            Shape {
                d_conv: 2,
                norm: NormKind::Layer,
                bias: true,
                ..b.clone()
            },
        ),
        (
            "d_conv_1",
            Shape {
                d_conv: 1,
                ..b.clone()
            },
        ),
        (
            "seq_len_1_batch_3",
            Shape {
                seq_len: 1,
                batch: 3,
                ..b.clone()
            },
        ),
        (
            "no_state_no_resets",
            Shape {
                state: false,
                resets: false,
                ..b.clone()
            },
        ),
        (
            "state_without_resets",
            Shape {
                resets: false,
                ..b.clone()
            },
        ),
        // d_inner 69: eight full lanes plus a partial group, two channel blocks of 64.
        (
            "odd_lanes_long",
            Shape {
                d_model: 23,
                d_state: 5,
                dt_rank: 3,
                batch: 1,
                seq_len: 300,
                ..b.clone()
            },
        ),
        (
            "long_batch_3_untied",
            Shape {
                batch: 3,
                seq_len: 300,
                tied: false,
                n_layer: 1,
                ..b.clone()
            },
        ),
        // Mamba-130M proportions (d_inner = 2 · d_model, d_state 16) at a size the scalar
        // reference runs quickly: longer sums in every GEMM than the other cases.
        (
            "mamba_like_d_model_96",
            Shape {
                d_model: 96,
                expand: 2,
                d_state: 16,
                dt_rank: 6,
                vocab: 211,
                seq_len: 128,
                ..b.clone()
            },
        ),
    ]
}

#[test]
fn backward_matches_reference_over_the_shape_table() {
    let cases = shape_table();
    let mut worst = (0.0f64, 0.0f64);
    for (name, s) in &cases {
        let w = check_backward(name, s);
        worst = (worst.0.max(w.0), worst.1.max(w.1));
    }
    println!(
        "shape table: worst relative error params {:.3e} (limit {:.0e}), state {:.3e} (limit {:.0e})",
        worst.0, SIMD_BACKWARD_F32, worst.1, SIMD_BACKWARD_STATE_F32
    );
}

#[test]
fn backward_adds_to_the_gradients_already_there() {
    let case = Case::new("accumulates", &base());
    let (cache, d_logits) = case.forward();
    let mut rng = Rng::new(7);
    let mut start = Params::<f32>::zeros(&case.cfg);
    for t in start.tensors_mut() {
        t.data
            .iter_mut()
            .for_each(|v| *v = 0.01 * rng.normal() as f32);
    }
    let mut want = start.clone();
    backward(
        &case.cfg,
        &case.params,
        &case.batch(),
        case.state.as_ref(),
        &cache,
        &d_logits,
        &mut want,
    )
    .unwrap();
    let mut got = start;
    simd::backward::backward(
        &pool(2),
        &case.cfg,
        &case.params,
        &case.batch(),
        case.state.as_ref(),
        &cache,
        &d_logits,
        &mut got,
    )
    .unwrap();
    for (((name, shape), g), w) in param_specs(&case.cfg)
        .iter()
        .zip(got.tensors())
        .zip(want.tensors())
    {
        assert_close(
            &format!("accumulated {name}"),
            shape,
            &g.data,
            &w.data,
            SIMD_BACKWARD_F32,
        );
    }
}

#[test]
fn backward_rejects_a_bad_d_logits_length() {
    let case = Case::new("bad_len", &base());
    let (cache, d_logits) = case.forward();
    let mut g = Params::zeros(&case.cfg);
    let r = simd::backward::backward(
        &pool(1),
        &case.cfg,
        &case.params,
        &case.batch(),
        case.state.as_ref(),
        &cache,
        &d_logits[1..],
        &mut g,
    );
    assert!(r.is_err());
}

fn shape_strategy() -> impl Strategy<Value = Shape> {
    (
        (1usize..18, 1usize..4, 1usize..18, 1usize..6, 1usize..5),
        (1usize..3, 2usize..20, 1usize..4, 1usize..40),
        any::<[bool; 6]>(),
    )
        .prop_map(
            |((d_model, expand, d_state, dt_rank, d_conv), (n_layer, vocab, batch, seq_len), f)| {
                Shape {
                    d_model,
                    expand,
                    d_state,
                    dt_rank,
                    d_conv,
                    n_layer,
                    vocab,
                    norm: if f[0] { NormKind::Rms } else { NormKind::Layer },
                    tied: f[1],
                    bias: f[2],
                    conv_bias: f[3],
                    batch,
                    seq_len,
                    resets: f[4],
                    state: f[5],
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, rng_seed: proptest::test_runner::RngSeed::Fixed(20261130), failure_persistence: None, ..ProptestConfig::default() })]

    /// Every gradient of the simd backward matches the reference on random shapes and inputs,
    /// with the same bits on 1 and 2 threads.
    #[test]
    fn backward_matches_reference_on_random_shapes(s in shape_strategy(), seed in 0u64..1_000_000) {
        check_backward(&format!("prop_{seed}"), &s);
    }
}
