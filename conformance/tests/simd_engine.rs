//! The simd tier as a whole training engine (its own forward feeding its backward, the loss,
//! AdamW, checkpoint round trips) against `ReferenceEngine<f32>` through the `Engine` trait,
//! as the trainer drives it.

use conformance::tol::{
    SIMD_BACKWARD_F32, SIMD_BACKWARD_STATE_F32, SIMD_CE_LOSS_F32, SIMD_INFER_F32,
};
use conformance::{
    assert_close, random_flags, random_params, random_state, random_tokens, SmallModel,
};
use reference::loss::next_token_targets;
use reference::model::Batch;
use reference::rng::Rng;
use reference::{AdamWConfig, Engine, NormKind, ReferenceEngine};
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

/// Two accumulated micro-batches with resets, a mask and an initial state, then an AdamW step
/// and a second forward: loss, every gradient, the state gradient and the updated parameters
/// and logits agree with the reference.
#[test]
fn training_steps_match_the_reference() {
    for (mi, m) in models().into_iter().enumerate() {
        let cfg = m.config();
        let params = random_params::<f32>(&cfg, 900 + mi as u64);
        let mut rng = Rng::new(17 + mi as u64);
        let (b, l) = (2, 41);
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
            let tokens = random_tokens(&mut rng, &cfg, b * (l + 1));
            let resets = random_flags(&mut rng, b * l, 0.05);
            let state = random_state::<f32>(&mut rng, &cfg, b);
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
        for ((name, g), (_, w)) in got.gradients().iter().zip(want.gradients().iter()) {
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
        for ((name, g), (_, w)) in got.parameters().iter().zip(want.parameters().iter()) {
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
        let st = got.optimizer_state();
        assert_eq!(st.step, 1);
        let mut again =
            SimdEngine::new(cfg.clone(), random_params(&cfg, 1), &SimdOptions::default()).unwrap();
        again.set_parameters(&got.parameters()).unwrap();
        again.set_optimizer_state(&st).unwrap();
        assert_eq!(again.optimizer_state(), st);
        assert_eq!(again.parameters(), got.parameters());
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
