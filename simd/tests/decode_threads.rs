//! Decode steps give the same bits on any number of threads: each parallel region's split
//! (on rayon's pool, or on the spinning team of a decode step) gives every output element to
//! exactly one task, whose sum runs in a fixed order.

use reference::{InferenceEngine, MambaConfig, State};
use simd::{SimdEngine, SimdOptions, WeightDtype};

/// Logits of `steps` greedy decode steps after a short prompt, at batch `batch`.
fn decode(e: &mut SimdEngine, cfg: &MambaConfig, batch: usize, steps: usize) -> Vec<u32> {
    let mut st = State::zeros(cfg, batch);
    let mut logits = vec![0f32; batch * cfg.vocab_size];
    let mut toks: Vec<u32> = (0..batch as u32).map(|b| 7 + 13 * b).collect();
    let mut bits = Vec::new();
    for i in 0..steps {
        e.step_into(&toks, None, &mut st, &mut logits).unwrap();
        bits.extend(logits.iter().map(|v| v.to_bits()));
        for (b, t) in toks.iter_mut().enumerate() {
            // The next input mixes the step's argmax with a seeded walk.
            let row = &logits[b * cfg.vocab_size..(b + 1) * cfg.vocab_size];
            let arg = row
                .iter()
                .enumerate()
                .fold(0, |a, (j, v)| if *v > row[a] { j } else { a });
            *t = ((arg as u32) * 31 + i as u32 * 7 + *t) % cfg.vocab_size as u32;
        }
    }
    bits
}

#[test]
fn decode_steps_are_the_same_bits_on_one_two_and_three_threads() {
    // Wide enough that in_proj, out_proj, the lm_head and (at batch 4) the scan are split.
    let cfg = MambaConfig::new(256, 2, 1000);
    let params = reference::init::init_params::<f32>(&cfg, 11);
    for dtype in [
        WeightDtype::F32,
        WeightDtype::Bf16,
        WeightDtype::Int8,
        WeightDtype::Int4,
    ] {
        for batch in [1, 4] {
            let run = |threads: usize| {
                let o = SimdOptions {
                    threads,
                    dtype,
                    isa: None,
                };
                let mut e = SimdEngine::new(cfg.clone(), params.clone(), &o).unwrap();
                decode(&mut e, &cfg, batch, 24)
            };
            let one = run(1);
            assert!(one.iter().any(|&b| b != 0));
            for threads in [2, 3] {
                let many = run(threads);
                let first = one.iter().zip(&many).position(|(a, b)| a != b);
                assert!(
                    first.is_none(),
                    "{dtype:?}, batch {batch}: {threads} threads differ from one at logit {:?}",
                    first
                );
            }
        }
    }
}
