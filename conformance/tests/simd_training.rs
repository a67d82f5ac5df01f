//! The simd tier's training half against the f32 reference: the backward (every parameter
//! gradient and the initial state's), the masked cross-entropy, and one AdamW step.
//!
//! Each backward case runs the *reference* forward (with its cache), so these tests do not
//! depend on the simd forward. Cases cover odd widths (d_model 1, 3, 5, 17; odd d_inner;
//! d_state 1 to 17; dt_rank 1 to 5), seq_len 1 and 300, batch 1 to 3, resets, initial states,
//! tied and untied heads, RMSNorm and LayerNorm, biases on and off, and pools of 1 and 2
//! threads (the same bits for both, and from run to run).

use conformance::tol::{
    SIMD_ADAMW_F32, SIMD_BACKWARD_F32, SIMD_BACKWARD_STATE_F32, SIMD_CE_GRAD_F32, SIMD_CE_LOSS_F32,
};
use conformance::{assert_close, diff, random_flags, random_params, random_state, random_tokens};
use proptest::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};
use reference::loss::{cross_entropy, next_token_targets};
use reference::model::{backward, forward, Batch, ForwardCache};
use reference::optim::{AdamW, StepStats};
use reference::rng::Rng;
use reference::{param_specs, AdamWConfig, MambaConfig, NormKind, Params, State};

fn pool(threads: usize) -> ThreadPool {
    ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

/// A backward case: the model's shape and the batch's.
#[derive(Clone, Debug)]
struct Shape {
    d_model: usize,
    expand: usize,
    d_state: usize,
    dt_rank: usize,
    d_conv: usize,
    n_layer: usize,
    vocab: usize,
    norm: NormKind,
    tied: bool,
    bias: bool,
    conv_bias: bool,
    batch: usize,
    seq_len: usize,
    resets: bool,
    state: bool,
}

impl Shape {
    fn config(&self) -> MambaConfig {
        let mut c = MambaConfig::new(self.d_model, self.n_layer, self.vocab);
        c.d_state = self.d_state;
        c.d_conv = self.d_conv;
        c.expand = self.expand;
        c.d_inner = self.expand * self.d_model;
        c.dt_rank = self.dt_rank;
        c.norm = self.norm;
        c.tie_embeddings = self.tied;
        c.use_bias = self.bias;
        c.conv_bias = self.conv_bias;
        c
    }
}

/// A small default to vary one knob at a time from.
fn base() -> Shape {
    Shape {
        d_model: 5,
        expand: 3,
        d_state: 3,
        dt_rank: 2,
        d_conv: 4,
        n_layer: 2,
        vocab: 13,
        norm: NormKind::Rms,
        tied: true,
        bias: false,
        conv_bias: true,
        batch: 2,
        seq_len: 9,
        resets: true,
        state: true,
    }
}

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

#[test]
fn backward_matches_reference_over_the_shape_table() {
    let b = base();
    let cases: Vec<(&str, Shape)> = vec![
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
    ];
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

fn check_loss(name: &str, n: usize, vocab: usize, masked: bool, scale: f32) -> (f64, f64) {
    let mut rng = Rng::new(conformance::seed_of(name));
    let logits: Vec<f32> = (0..n * vocab).map(|_| 3.0 * rng.normal() as f32).collect();
    let targets: Vec<u32> = (0..n).map(|_| rng.below(vocab as u64) as u32).collect();
    let mask = masked.then(|| random_flags(&mut rng, n, 0.7));
    let want = cross_entropy(&logits, &targets, mask.as_deref(), vocab, scale).unwrap();
    let mut first = None;
    let mut worst = (0.0f64, 0.0f64);
    for t in [1, 2] {
        let got =
            simd::loss::cross_entropy(&pool(t), &logits, &targets, mask.as_deref(), vocab, scale)
                .unwrap();
        assert_eq!(got.n_targets, want.n_targets, "{name}: n_targets");
        let dl = diff(&[got.loss], &[want.loss]).rel;
        assert!(
            dl <= SIMD_CE_LOSS_F32 && got.loss.is_finite(),
            "{name}: loss {} vs {} (relative {dl:.3e})",
            got.loss,
            want.loss
        );
        assert_close(
            &format!("{name}: d_logits"),
            &[n, vocab],
            &got.d_logits,
            &want.d_logits,
            SIMD_CE_GRAD_F32,
        );
        worst = (
            worst.0.max(dl),
            worst.1.max(diff(&got.d_logits, &want.d_logits).rel),
        );
        let bits: Vec<u32> = got
            .d_logits
            .iter()
            .map(|v| v.to_bits())
            .chain([got.loss.to_bits()])
            .collect();
        match &first {
            None => first = Some(bits),
            Some(f) => assert_eq!(f, &bits, "{name}: 1 and 2 threads differ"),
        }
    }
    println!(
        "{name}: loss relative error {:.3e}, d_logits {:.3e}",
        worst.0, worst.1
    );
    worst
}

#[test]
fn cross_entropy_matches_reference() {
    for (name, n, vocab, masked, scale) in [
        ("ce_tiny_vocab", 5, 2, false, 1.0),
        ("ce_odd_vocab_masked", 37, 101, true, 0.25),
        ("ce_vocab_below_lanes", 9, 7, true, 1.0),
        ("ce_gpt2_vocab", 6, 50280, true, 0.5),
    ] {
        check_loss(name, n, vocab, masked, scale);
    }
}

#[test]
fn cross_entropy_with_an_empty_mask_is_zero_and_rejects_bad_targets() {
    let logits = vec![0.5f32; 3 * 4];
    let p = pool(2);
    let out =
        simd::loss::cross_entropy(&p, &logits, &[1, 2, 3], Some(&[false; 3]), 4, 1.0).unwrap();
    assert_eq!((out.loss, out.n_targets), (0.0, 0));
    assert!(out.d_logits.iter().all(|&v| v == 0.0));
    assert!(simd::loss::cross_entropy(&p, &logits, &[1, 9, 3], None, 4, 1.0).is_err());
    assert!(simd::loss::cross_entropy(&p, &logits[1..], &[1, 2, 3], None, 4, 1.0).is_err());
}

/// Random parameters, gradients of scale `g_scale` and moments after `steps` earlier steps.
fn adam_inputs(name: &str, g_scale: f64) -> (MambaConfig, Params<f32>, Params<f32>, AdamW<f32>) {
    let s = Shape {
        norm: NormKind::Layer,
        tied: false,
        bias: true,
        ..base()
    };
    let cfg = s.config();
    let seed = conformance::seed_of(name);
    let params = random_params::<f32>(&cfg, seed);
    let mut rng = Rng::new(seed ^ 1);
    let mut grads = Params::<f32>::zeros(&cfg);
    for t in grads.tensors_mut() {
        t.data
            .iter_mut()
            .for_each(|v| *v = (g_scale * rng.normal()) as f32);
    }
    let mut opt = AdamW::<f32>::new(&cfg);
    for t in opt.m.tensors_mut() {
        t.data
            .iter_mut()
            .for_each(|v| *v = (0.01 * rng.normal()) as f32);
    }
    for t in opt.v.tensors_mut() {
        t.data
            .iter_mut()
            .for_each(|v| *v = (1e-4 * rng.normal().abs()) as f32);
    }
    opt.step = 3;
    (cfg, params, grads, opt)
}

fn check_adamw(name: &str, g_scale: f64, hp: &AdamWConfig, expect_clip: bool) -> f64 {
    let (cfg, params, grads, opt) = adam_inputs(name, g_scale);
    let (mut pw, mut gw, mut ow) = (params.clone(), grads.clone(), opt.clone());
    let sw = ow.step(&cfg, &mut pw, &mut gw, hp, 3e-3);
    let mut worst = 0.0f64;
    for t in [1, 2] {
        let (mut pg, mut gg, mut og) = (params.clone(), grads.clone(), opt.clone());
        let sg: StepStats =
            simd::optim::adamw_step(&pool(t), &cfg, &mut og, &mut pg, &mut gg, hp, 3e-3);
        assert_eq!((sg.clipped, sg.skipped), (sw.clipped, sw.skipped), "{name}");
        assert_eq!(sg.clipped, expect_clip, "{name}: clipping");
        assert!(
            (sg.grad_norm - sw.grad_norm).abs() <= 1e-12 * sw.grad_norm,
            "{name}: grad norm {} vs {}",
            sg.grad_norm,
            sw.grad_norm
        );
        assert_eq!(og.step, ow.step, "{name}: step count");
        for (what, g, w) in [
            ("params", &pg, &pw),
            ("m", &og.m, &ow.m),
            ("v", &og.v, &ow.v),
            ("clipped grads", &gg, &gw),
        ] {
            for (((pname, shape), a), b) in
                param_specs(&cfg).iter().zip(g.tensors()).zip(w.tensors())
            {
                worst = worst.max(diff(&a.data, &b.data).rel);
                assert_close(
                    &format!("{name}: {what} {pname}"),
                    shape,
                    &a.data,
                    &b.data,
                    SIMD_ADAMW_F32,
                );
            }
        }
    }
    println!("{name}: worst relative error {worst:.3e}");
    worst
}

#[test]
fn adamw_step_matches_reference() {
    let hp = AdamWConfig::default();
    check_adamw("adamw_clipped", 1.0, &hp, true);
    check_adamw("adamw_unclipped", 1e-3, &hp, false);
    let no_clip = AdamWConfig {
        max_grad_norm: None,
        weight_decay: 0.0,
        ..hp.clone()
    };
    check_adamw("adamw_no_clip_no_decay", 1.0, &no_clip, false);
}

#[test]
fn adamw_skips_a_non_finite_gradient() {
    let (cfg, params, mut grads, opt) = adam_inputs("adamw_nan", 1.0);
    grads.layers[0].d.data[1] = f32::NAN;
    let (mut p, mut o) = (params.clone(), opt.clone());
    let s = simd::optim::adamw_step(
        &pool(2),
        &cfg,
        &mut o,
        &mut p,
        &mut grads,
        &AdamWConfig::default(),
        1e-3,
    );
    assert!(s.skipped && !s.clipped && !s.grad_norm.is_finite());
    assert_eq!(p, params);
    assert_eq!(o, opt);
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

    /// Cross-entropy on random vocabularies and masks.
    #[test]
    fn cross_entropy_matches_reference_on_random_shapes(n in 1usize..20, vocab in 1usize..300, masked in any::<bool>(), seed in 0u64..1_000_000) {
        check_loss(&format!("prop_ce_{seed}"), n, vocab, masked, 0.5);
    }
}
