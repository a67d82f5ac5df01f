//! Batched decode on the simd tier: one `step_into` over B sequences (each with its own state,
//! prompts of different lengths) gives the same greedy tokens as B separate runs, for every
//! weight format and every instruction set this CPU has (the others are named as skipped).

use conformance::tol::SIMD_INFER_F32;
use conformance::{assert_close, random_params, random_tokens, seed_of, SmallModel};
use reference::rng::Rng;
use reference::{InferenceEngine, MambaConfig, NormKind, State, Tensor};
use simd::{Isa, SimdEngine, SimdOptions, WeightDtype};

const DTYPES: [WeightDtype; 4] = [
    WeightDtype::F32,
    WeightDtype::Bf16,
    WeightDtype::Int8,
    WeightDtype::Int4,
];

/// Sequence states `[n_layer, 1, ...]` stacked into one batch state `[n_layer, B, ...]`.
fn stack(cfg: &MambaConfig, states: &[State<f32>]) -> State<f32> {
    let b = states.len();
    let gather = |f: &dyn Fn(&State<f32>) -> &Tensor<f32>, tail: &[usize]| {
        let per: usize = tail.iter().product();
        let mut data = Vec::with_capacity(cfg.n_layer * b * per);
        for i in 0..cfg.n_layer {
            for s in states {
                data.extend_from_slice(&f(s).data[i * per..(i + 1) * per]);
            }
        }
        let mut shape = vec![cfg.n_layer, b];
        shape.extend_from_slice(tail);
        Tensor::from_vec(&shape, data)
    };
    State {
        conv: gather(&|s| &s.conv, &[cfg.d_inner, cfg.d_conv - 1]),
        ssm: gather(&|s| &s.ssm, &[cfg.d_inner, cfg.d_state]),
    }
}

fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in l.iter().enumerate() {
        if v > l[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy tokens of each prompt decoded alone (batch 1), and the logits of every step.
fn alone(e: &mut SimdEngine, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let cfg = e.config().clone();
    let mut st = State::zeros(&cfg, 1);
    let mut logits = vec![0f32; cfg.vocab_size];
    e.prefill(prompt, &mut st, &mut logits).unwrap();
    let (mut toks, mut all) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let t = argmax(&logits);
        toks.push(t);
        e.step_into(&[t], None, &mut st, &mut logits).unwrap();
        all.push(logits.clone());
    }
    (toks, all)
}

fn check(name: &str, m: &SmallModel, lens: &[usize], steps: usize) {
    let cfg = m.config();
    let params = random_params::<f32>(&cfg, seed_of(name));
    let mut rng = Rng::new(seed_of(name) ^ 1);
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .map(|&l| random_tokens(&mut rng, &cfg, l))
        .collect();
    let b = prompts.len();
    let v = cfg.vocab_size;
    for isa in Isa::ALL {
        if !isa.supported() {
            println!("{name}: skipping {}: not supported by this CPU", isa.name());
            continue;
        }
        for dtype in DTYPES {
            let opts = SimdOptions {
                threads: 2,
                dtype,
                isa: Some(isa),
            };
            let mut e = SimdEngine::new(cfg.clone(), params.clone(), &opts).unwrap();
            let want: Vec<_> = prompts.iter().map(|p| alone(&mut e, p, steps)).collect();
            // Each prompt prefilled on its own, then every step over the whole batch.
            let mut singles = Vec::new();
            let mut logits = vec![0f32; b * v];
            for (i, p) in prompts.iter().enumerate() {
                let mut st = State::zeros(&cfg, 1);
                e.prefill(p, &mut st, &mut logits[i * v..(i + 1) * v])
                    .unwrap();
                singles.push(st);
            }
            let mut st = stack(&cfg, &singles);
            for t in 0..steps {
                let toks: Vec<u32> = (0..b)
                    .map(|i| argmax(&logits[i * v..(i + 1) * v]))
                    .collect();
                for (i, &tok) in toks.iter().enumerate() {
                    assert_eq!(
                        tok, want[i].0[t],
                        "{name} {isa:?} {dtype:?}: sequence {i} (prompt {}) step {t}",
                        lens[i]
                    );
                }
                e.step_into(&toks, None, &mut st, &mut logits).unwrap();
                for i in 0..b {
                    assert_close(
                        &format!("{name} {isa:?} {dtype:?} seq {i} step {t}"),
                        &[v],
                        &logits[i * v..(i + 1) * v],
                        &want[i].1[t],
                        SIMD_INFER_F32,
                    );
                }
            }
        }
    }
}

fn model(d_model: usize, vocab: usize) -> SmallModel {
    SmallModel {
        d_model,
        n_layer: 2,
        vocab,
        d_state: 16,
        d_conv: 4,
        expand: 2,
        norm: NormKind::Rms,
        tied: false,
        bias: false,
        conv_bias: true,
    }
}

#[test]
fn batch_of_five_prompts_of_different_lengths_decodes_like_five_runs() {
    check("b5_mixed", &model(64, 300), &[3, 17, 1, 9, 30], 12);
}

#[test]
fn batch_of_sixteen_with_odd_widths_decodes_like_sixteen_runs() {
    let lens: Vec<usize> = (0..16).map(|i| 1 + (i * 7) % 23).collect();
    check("b16_odd", &model(37, 101), &lens, 6);
}
