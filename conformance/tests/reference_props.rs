//! Property tests of the reference over random small configs and inputs: recurrence, chaining,
//! and directional derivatives against central differences. (AdamW's contracts are in
//! `adamw.rs`.)

use conformance::{random_flags, random_params, random_state, random_tokens, SmallModel};
use proptest::prelude::*;
use reference::loss::{cross_entropy, next_token_targets};
use reference::model::{backward, forward, step, Batch};
use reference::rng::Rng;
use reference::{MambaConfig, Params, State};

fn small_model() -> impl Strategy<Value = SmallModel> {
    // d_model >= 2: at d_model 1 RMSNorm is x / sqrt(x² + eps), a near-step function whose
    // curvature defeats any finite-difference step.
    conformance::small_models(2..9, 2..13, 1..6, 1..3)
}

struct Inputs {
    cfg: MambaConfig,
    params: Params<f64>,
    tokens: Vec<u32>,
    resets: Vec<bool>,
    state: State<f64>,
}

fn inputs(m: &SmallModel, seed: u64, batch: usize, seq_len: usize) -> Inputs {
    let cfg = m.config();
    let mut rng = Rng::new(seed);
    Inputs {
        params: random_params(&cfg, seed),
        tokens: random_tokens(&mut rng, &cfg, batch * seq_len),
        resets: random_flags(&mut rng, batch * seq_len, 0.2),
        state: random_state(&mut rng, &cfg, batch),
        cfg,
    }
}

proptest! {
    // A fixed seed: the same cases on every run and machine.
    #![proptest_config(ProptestConfig { cases: 48, rng_seed: proptest::test_runner::RngSeed::Fixed(20261129), failure_persistence: None, ..ProptestConfig::default() })]

    /// Chained single-token steps give the same bits as the full forward, resets included.
    #[test]
    fn steps_equal_forward(m in small_model(), seed in any::<u64>(), batch in 1usize..4, seq_len in 1usize..12) {
        let x = inputs(&m, seed, batch, seq_len);
        let input = Batch { batch, seq_len, tokens: &x.tokens, resets: Some(&x.resets) };
        let (logits, last, _) = forward(&x.cfg, &x.params, &input, Some(&x.state), false).unwrap();
        let mut s = x.state.clone();
        let v = x.cfg.vocab_size;
        for t in 0..seq_len {
            let col: Vec<u32> = (0..batch).map(|b| x.tokens[b * seq_len + t]).collect();
            let rs: Vec<bool> = (0..batch).map(|b| x.resets[b * seq_len + t]).collect();
            let l = step(&x.cfg, &x.params, &col, Some(&rs), &mut s).unwrap();
            for b in 0..batch {
                prop_assert_eq!(&l.data[b * v..(b + 1) * v], &logits.data[(b * seq_len + t) * v..(b * seq_len + t + 1) * v]);
            }
        }
        prop_assert_eq!(s, last);
    }

    /// The loss's derivative along a random direction matches the analytic gradient.
    #[test]
    fn directional_derivative_matches_central_difference(m in small_model(), seed in any::<u64>(), seq_len in 2usize..8) {
        let batch = 2;
        let x = inputs(&m, seed, batch, seq_len);
        let input = Batch { batch, seq_len, tokens: &x.tokens, resets: Some(&x.resets) };
        let (targets, mask) = next_token_targets(&x.tokens, batch, seq_len);
        let loss = |p: &Params<f64>, s: &State<f64>| {
            let (l, _, _) = forward(&x.cfg, p, &input, Some(s), false).unwrap();
            cross_entropy(&l.data, &targets, Some(&mask), x.cfg.vocab_size, 1.0).unwrap().loss
        };
        let (l, _, cache) = forward(&x.cfg, &x.params, &input, Some(&x.state), true).unwrap();
        let lo = cross_entropy(&l.data, &targets, Some(&mask), x.cfg.vocab_size, 1.0).unwrap();
        let mut g = Params::zeros(&x.cfg);
        let gs = backward(&x.cfg, &x.params, &input, Some(&x.state), &cache.unwrap(), &lo.d_logits, &mut g).unwrap();
        // Direction: N(0, 1) over every parameter and state element.
        let mut rng = Rng::new(seed ^ 0xd1);
        let mut dir_p: Params<f64> = Params::zeros(&x.cfg);
        let mut dir_s = State::zeros(&x.cfg, batch);
        let mut analytic = 0.0;
        for (d, gt) in dir_p.tensors_mut().into_iter().zip(g.tensors()) {
            for (dv, gv) in d.data.iter_mut().zip(&gt.data) {
                *dv = rng.normal();
                analytic += *dv * gv;
            }
        }
        for (d, gv) in dir_s.conv.data.iter_mut().chain(dir_s.ssm.data.iter_mut()).zip(gs.conv.data.iter().chain(&gs.ssm.data)) {
            *d = rng.normal();
            analytic += *d * gv;
        }
        let h = 1e-6;
        let shifted = |sign: f64| {
            let mut p = x.params.clone();
            for (t, d) in p.tensors_mut().into_iter().zip(dir_p.tensors()) {
                for (v, dv) in t.data.iter_mut().zip(&d.data) { *v += sign * h * dv; }
            }
            let mut s = x.state.clone();
            for (v, dv) in s.conv.data.iter_mut().chain(s.ssm.data.iter_mut()).zip(dir_s.conv.data.iter().chain(&dir_s.ssm.data)) {
                *v += sign * h * dv;
            }
            loss(&p, &s)
        };
        let fd = (shifted(1.0) - shifted(-1.0)) / (2.0 * h);
        prop_assert!((fd - analytic).abs() <= 1e-5 * analytic.abs().max(1.0), "fd {fd} vs analytic {analytic}");
    }
}
