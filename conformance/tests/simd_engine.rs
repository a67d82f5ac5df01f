//! The simd tier as a whole training engine (its own forward feeding its backward, the loss,
//! AdamW, checkpoint round trips) against `ReferenceEngine<f32>` through the engine traits,
//! as the trainer drives it.

use approx::assert_relative_eq;
use conformance::tol::{
    SIMD_BACKWARD_F32, SIMD_BACKWARD_STATE_F32, SIMD_CE_LOSS_F32, SIMD_INFER_F32, SIMD_QUANT_BF16,
};
use conformance::{
    assert_close, random_flags, random_params, random_state, random_tokens, SmallModel,
};
use reference::loss::next_token_targets;
use reference::model::Batch;
use reference::rng::Rng;
use reference::{AdamWConfig, InferenceEngine, NormKind, ReferenceEngine, TrainingEngine};
use simd::{SimdEngine, SimdOptions};

fn models() -> Vec<SmallModel> {
    let base = SmallModel {
        d_model: 19,
        n_layer: 2,
        vocab: 53,
        d_state: 9,
        d_conv: 4,
        expand: 2,
        norm: NormKind::Rms,
        tied: true,
        bias: false,
        conv_bias: true,
    };
    vec![
        base.clone(),
        SmallModel {
            d_model: 8,
            d_state: 16,
            d_conv: 2,
            expand: 3,
            norm: NormKind::Layer,
            tied: false,
            bias: true,
            conv_bias: false,
            ..base
        },
    ]
}

/// One micro-batch with resets, a mask and an initial state into both engines' gradients:
/// the loss and the state gradients agree.
fn micro_batch(
    want: &mut ReferenceEngine<f32>,
    got: &mut SimdEngine,
    rng: &mut Rng,
    cfg: &reference::MambaConfig,
    (mi, micro): (usize, usize),
) {
    let (b, l) = (2, 41);
    let tokens = random_tokens(rng, cfg, b * (l + 1));
    let resets = random_flags(rng, b * l, 0.05);
    let state = random_state::<f32>(rng, cfg, b);
    let (targets, mut mask) = next_token_targets(&tokens, b, l);
    for (i, m) in mask.iter_mut().enumerate() {
        *m &= i % 7 != 3;
    }
    let inputs: Vec<u32> = (0..b)
        .flat_map(|r| tokens[r * (l + 1)..r * (l + 1) + l].to_vec())
        .collect();
    let batch = Batch {
        batch: b,
        seq_len: l,
        tokens: &inputs,
        resets: Some(&resets),
    };
    let wl = want
        .loss_and_backward(&batch, &targets, Some(&mask), Some(&state), 0.5)
        .unwrap();
    let gl = got
        .loss_and_backward(&batch, &targets, Some(&mask), Some(&state), 0.5)
        .unwrap();
    let what = format!("model {mi} micro-batch {micro}");
    assert_close(
        &format!("{what} loss"),
        &[1],
        &[gl.loss],
        &[wl.loss],
        SIMD_CE_LOSS_F32,
    );
    assert_eq!(gl.n_targets, wl.n_targets);
    assert_close(
        &format!("{what} d state.ssm"),
        &wl.grad_state.ssm.shape,
        &gl.grad_state.ssm.data,
        &wl.grad_state.ssm.data,
        SIMD_BACKWARD_STATE_F32,
    );
    assert_close(
        &format!("{what} d state.conv"),
        &wl.grad_state.conv.shape,
        &gl.grad_state.conv.data,
        &wl.grad_state.conv.data,
        SIMD_BACKWARD_STATE_F32,
    );
}

/// Two accumulated micro-batches with resets, a mask and an initial state, then an AdamW step
/// and a second forward: loss, every gradient, the state gradient and the updated parameters
/// and logits agree with the reference.
#[test]
fn training_steps_match_the_reference() {
    for (mi, m) in models().into_iter().enumerate() {
        let cfg = m.config();
        let params = random_params::<f32>(&cfg, 900 + mi as u64);
        let mut rng = Rng::new(17 + mi as u64);
        let hp = AdamWConfig::default();
        let mut want = ReferenceEngine::new(cfg.clone(), params.clone());
        let mut got = SimdEngine::new(
            cfg.clone(),
            params,
            &SimdOptions {
                threads: 2,
                ..Default::default()
            },
        )
        .unwrap();
        for micro in 0..2 {
            micro_batch(&mut want, &mut got, &mut rng, &cfg, (mi, micro));
        }
        for ((name, g), (_, w)) in got
            .gradients()
            .unwrap()
            .iter()
            .zip(want.gradients().unwrap().iter())
        {
            assert_close(
                &format!("model {mi} accumulated grad {name}"),
                &w.shape,
                &g.data,
                &w.data,
                SIMD_BACKWARD_F32,
            );
        }
        let ws = want.optimizer_step(&hp, 1e-3).unwrap();
        let gs = got.optimizer_step(&hp, 1e-3).unwrap();
        assert!(!gs.skipped && !ws.skipped);
        assert_close(
            &format!("model {mi} grad norm"),
            &[1],
            &[gs.grad_norm],
            &[ws.grad_norm],
            SIMD_BACKWARD_F32,
        );
        for ((name, g), (_, w)) in got
            .parameters()
            .unwrap()
            .iter()
            .zip(want.parameters().unwrap().iter())
        {
            assert_close(
                &format!("model {mi} updated {name}"),
                &w.shape,
                &g.data,
                &w.data,
                SIMD_INFER_F32,
            );
        }
        // The inference weights follow the update.
        let toks: Vec<u32> = (0..30)
            .map(|i| (i * 11 + 3) % cfg.vocab_size as u32)
            .collect();
        let (gl, _) = got.forward(&Batch::new(&toks, 1, 30), None).unwrap();
        let (wl, _) = want.forward(&Batch::new(&toks, 1, 30), None).unwrap();
        assert_close(
            &format!("model {mi} logits after the step"),
            &wl.shape,
            &gl.data,
            &wl.data,
            SIMD_INFER_F32,
        );
        // Optimizer state round trip (resume).
        let st = got.optimizer_state().unwrap();
        assert_eq!(st.step, 1);
        let mut again =
            SimdEngine::new(cfg.clone(), random_params(&cfg, 1), &SimdOptions::default()).unwrap();
        again.set_parameters(&got.parameters().unwrap()).unwrap();
        again.set_optimizer_state(&st).unwrap();
        assert_eq!(again.optimizer_state().unwrap(), st);
        assert_eq!(again.parameters().unwrap(), got.parameters().unwrap());
    }
}

/// bf16 / int8 engines serve inference only: training them is a clear error, not a silent
/// f32 run.
#[test]
fn reduced_precision_engines_refuse_to_train() {
    let cfg = models()[0].config();
    let p = random_params::<f32>(&cfg, 3);
    for dtype in [simd::WeightDtype::Bf16, simd::WeightDtype::Int8] {
        let mut e = SimdEngine::new(
            cfg.clone(),
            p.clone(),
            &SimdOptions {
                dtype,
                ..Default::default()
            },
        )
        .unwrap();
        let toks = [1u32, 2, 3];
        let err = e
            .loss_and_backward(&Batch::new(&toks, 1, 3), &[2, 3, 4], None, None, 1.0)
            .expect_err("must refuse");
        assert!(err.to_string().contains("needs f32 weights"), "{err}");
    }
}

/// The simd tier's forward-only loss: the training loss within `SIMD_CE_LOSS_F32` (and the
/// reference's), gradients left exactly as they were, and it runs on bf16 weights, which
/// cannot train.
#[test]
fn forward_only_loss_is_the_training_loss_and_keeps_the_gradients() {
    let m = &models()[1];
    let cfg = m.config();
    let params = random_params::<f32>(&cfg, 77);
    let mut rng = Rng::new(78);
    let (b, l) = (3, 29);
    let tokens = random_tokens(&mut rng, &cfg, b * l);
    let resets = random_flags(&mut rng, b * l, 0.05);
    let state = random_state::<f32>(&mut rng, &cfg, b);
    let (targets, mut mask) = next_token_targets(&tokens, b, l);
    mask.iter_mut()
        .enumerate()
        .for_each(|(i, m)| *m &= i % 4 != 1);
    let batch = Batch {
        batch: b,
        seq_len: l,
        tokens: &tokens,
        resets: Some(&resets),
    };
    let simd = |dtype| {
        let o = SimdOptions {
            threads: 2,
            dtype,
            ..Default::default()
        };
        SimdEngine::new(cfg.clone(), params.clone(), &o).unwrap()
    };
    let mut got = simd(simd::WeightDtype::F32);
    let mut want = ReferenceEngine::new(cfg.clone(), params.clone());
    got.loss_and_backward(&batch, &targets, None, None, 1.0)
        .unwrap();
    let grads = got.gradients().unwrap();
    let eval = got
        .loss(&batch, &targets, Some(&mask), Some(&state))
        .unwrap();
    assert_eq!(got.gradients().unwrap(), grads, "loss moved the gradients");
    let reference = want
        .loss(&batch, &targets, Some(&mask), Some(&state))
        .unwrap();
    let trained = got
        .loss_and_backward(&batch, &targets, Some(&mask), Some(&state), 1.0)
        .unwrap();
    assert_eq!(eval.n_targets, trained.n_targets);
    assert_eq!(eval.n_targets, reference.n_targets);
    assert_relative_eq!(eval.loss, trained.loss, max_relative = SIMD_CE_LOSS_F32);
    assert_relative_eq!(eval.loss, reference.loss, max_relative = SIMD_CE_LOSS_F32);
    let mut low = simd(simd::WeightDtype::Bf16);
    let lowp = low
        .loss(&batch, &targets, Some(&mask), Some(&state))
        .unwrap();
    assert_relative_eq!(lowp.loss, reference.loss, max_relative = SIMD_QUANT_BF16);
}
