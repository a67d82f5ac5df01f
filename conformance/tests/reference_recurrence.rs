//! The reference's recurrence contracts: the single-token step equals the full forward, a
//! reset equals running the documents separately, and a forward can be split anywhere by
//! carrying the state across.

use conformance::tol::{STEP_VS_FORWARD_F32, STEP_VS_FORWARD_F64};
use conformance::{assert_close, random_params, random_state, random_tokens, seed_of, SmallModel};
use reference::model::{forward, step, Batch};
use reference::rng::Rng;
use reference::{Float, InferenceEngine, MambaConfig, NormKind, ReferenceEngine, State};

fn engine<T: Float>(name: &str, m: &SmallModel) -> ReferenceEngine<T> {
    let cfg = m.config();
    let p = random_params::<T>(&cfg, seed_of(name));
    ReferenceEngine::new(cfg, p)
}

/// Runs `seq_len` single-token steps from `state` at full precision; returns logits
/// `[batch, seq_len, vocab]`.
fn stepwise<T: Float>(
    e: &ReferenceEngine<T>,
    tokens: &[u32],
    batch: usize,
    seq_len: usize,
    state: &mut State<T>,
) -> Vec<T> {
    let v = e.cfg.vocab_size;
    let mut out = vec![T::ZERO; batch * seq_len * v];
    for t in 0..seq_len {
        let col: Vec<u32> = (0..batch).map(|b| tokens[b * seq_len + t]).collect();
        let logits = step(&e.cfg, &e.params, &col, None, state).unwrap();
        for b in 0..batch {
            out[(b * seq_len + t) * v..(b * seq_len + t + 1) * v]
                .copy_from_slice(&logits.data[b * v..(b + 1) * v]);
        }
    }
    out
}

fn step_matches_forward<T: Float>(name: &str, m: SmallModel, tol: f64) {
    let e = engine::<T>(name, &m);
    let cfg = e.cfg.clone();
    let mut rng = Rng::new(seed_of(name));
    let (batch, seq_len) = (3, 9);
    let tokens = random_tokens(&mut rng, &cfg, batch * seq_len);
    let s0: State<T> = random_state(&mut rng, &cfg, batch);
    let (logits, last, _) = forward(
        &cfg,
        &e.params,
        &Batch::new(&tokens, batch, seq_len),
        Some(&s0),
        false,
    )
    .unwrap();
    let mut s = s0.clone();
    let stepped = stepwise(&e, &tokens, batch, seq_len, &mut s);
    assert_close(
        &format!("{name}: logits"),
        &logits.shape,
        &stepped,
        &logits.data,
        tol,
    );
    assert_close(
        &format!("{name}: final conv"),
        &last.conv.shape,
        &s.conv.data,
        &last.conv.data,
        tol,
    );
    assert_close(
        &format!("{name}: final ssm"),
        &last.ssm.shape,
        &s.ssm.data,
        &last.ssm.data,
        tol,
    );
}

/// The engine's f32 boundary: `InferenceEngine::step` chained token by token equals `InferenceEngine::forward`.
#[test]
fn engine_step_equals_engine_forward() {
    let name = "engine_step";
    let mut e = engine::<f32>(name, &SmallModel::default());
    let cfg = e.cfg.clone();
    let mut rng = Rng::new(seed_of(name));
    let (batch, seq_len) = (2, 6);
    let tokens = random_tokens(&mut rng, &cfg, batch * seq_len);
    let s0: State<f32> = random_state(&mut rng, &cfg, batch);
    let (logits, last) = e
        .forward(&Batch::new(&tokens, batch, seq_len), Some(&s0))
        .unwrap();
    let mut s = s0;
    let v = cfg.vocab_size;
    for t in 0..seq_len {
        let col: Vec<u32> = (0..batch).map(|b| tokens[b * seq_len + t]).collect();
        let got = e.step(&col, None, &mut s).unwrap();
        for b in 0..batch {
            let want = &logits.data[(b * seq_len + t) * v..(b * seq_len + t + 1) * v];
            assert_eq!(&got.data[b * v..(b + 1) * v], want, "row {b} position {t}");
        }
    }
    assert_eq!(s, last);
}

#[test]
fn recurrent_step_equals_full_forward_f64() {
    step_matches_forward::<f64>("step_f64", SmallModel::default(), STEP_VS_FORWARD_F64);
    let ln = SmallModel {
        norm: NormKind::Layer,
        tied: false,
        bias: true,
        d_conv: 2,
        ..SmallModel::default()
    };
    step_matches_forward::<f64>("step_f64_ln", ln, STEP_VS_FORWARD_F64);
}

#[test]
fn recurrent_step_equals_full_forward_f32() {
    step_matches_forward::<f32>("step_f32", SmallModel::default(), STEP_VS_FORWARD_F32);
    let wide = SmallModel {
        d_model: 16,
        d_state: 8,
        d_conv: 3,
        ..SmallModel::default()
    };
    step_matches_forward::<f32>("step_f32_wide", wide, STEP_VS_FORWARD_F32);
}

fn logits_of(
    cfg: &MambaConfig,
    e: &ReferenceEngine<f64>,
    tokens: &[u32],
    resets: Option<&[bool]>,
    state: Option<&State<f64>>,
) -> (Vec<f64>, State<f64>) {
    let input = Batch {
        batch: 1,
        seq_len: tokens.len(),
        tokens,
        resets,
    };
    let (l, s, _) = forward(cfg, &e.params, &input, state, false).unwrap();
    (l.data, s)
}

#[test]
fn resets_equal_running_the_documents_separately() {
    let name = "resets_separate";
    let e = engine::<f64>(
        name,
        &SmallModel {
            d_conv: 4,
            ..SmallModel::default()
        },
    );
    let cfg = e.cfg.clone();
    let mut rng = Rng::new(seed_of(name));
    let seq_len = 11;
    let tokens = random_tokens(&mut rng, &cfg, seq_len);
    // Documents [0, 3), [3, 5), [5, 11); the first one continues the initial state.
    let mut resets = vec![false; seq_len];
    resets[3] = true;
    resets[5] = true;
    let s0: State<f64> = random_state(&mut rng, &cfg, 1);
    let (packed, packed_last) = logits_of(&cfg, &e, &tokens, Some(&resets), Some(&s0));
    let v = cfg.vocab_size;
    for (lo, hi) in [(0, 3), (3, 5), (5, 11)] {
        let state = (lo == 0).then_some(&s0);
        let (alone, alone_last) = logits_of(&cfg, &e, &tokens[lo..hi], None, state);
        assert_eq!(
            &packed[lo * v..hi * v],
            &alone[..],
            "document [{lo}, {hi}) differs when packed"
        );
        if hi == seq_len {
            assert_eq!(
                packed_last, alone_last,
                "final state of the last document differs"
            );
        }
    }
}

#[test]
fn a_forward_split_anywhere_and_chained_through_the_state_is_unchanged() {
    let name = "chaining";
    let e = engine::<f64>(
        name,
        &SmallModel {
            d_conv: 4,
            ..SmallModel::default()
        },
    );
    let cfg = e.cfg.clone();
    let mut rng = Rng::new(seed_of(name));
    let seq_len = 10;
    let tokens = random_tokens(&mut rng, &cfg, seq_len);
    let s0: State<f64> = random_state(&mut rng, &cfg, 1);
    let (whole, whole_last) = logits_of(&cfg, &e, &tokens, None, Some(&s0));
    let v = cfg.vocab_size;
    // Splits shorter than the conv window (1, 2) exercise the window carried across calls.
    for split in [1, 2, 5, 9] {
        let (a, sa) = logits_of(&cfg, &e, &tokens[..split], None, Some(&s0));
        let (b, sb) = logits_of(&cfg, &e, &tokens[split..], None, Some(&sa));
        assert_eq!(
            &whole[..split * v],
            &a[..],
            "split {split}: first part differs"
        );
        assert_eq!(
            &whole[split * v..],
            &b[..],
            "split {split}: second part differs"
        );
        assert_eq!(whole_last, sb, "split {split}: final state differs");
    }
}
