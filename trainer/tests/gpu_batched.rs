//! Continuous batching on the CUDA tier (bf16, the bundled tiny checkpoint): prompts of
//! different lengths, more of them than rows, rows held in device memory and the tokens
//! drawn there. Greedy answers (with a repetition penalty) at batch 1, 3, 8 and 10 are the lone
//! run's tokens (host sampler, batch 1; at 10, steps of more than 8 rows run cuBLAS and the
//! scan update of `ssm_update_f32`); seeded draws on the device repeat and stay inside the
//! tokenizer's ids. Without a CUDA device the test prints a `skipping` line and passes; on the
//! device: `bash scripts/gpu-tests.sh run`.

use std::ops::ControlFlow;

use reference::rng::Rng;
use reference::InferenceEngine;
use trainer::batched::generate_batched;
use trainer::checkpoint;
use trainer::device::{engine_with, EngineOptions};
use trainer::generate::{generate, Sampler, Sampling, Stop};

fn engine() -> Box<dyn InferenceEngine> {
    let dir = fixtures::tiny_checkpoint();
    let ck = checkpoint::load(&dir).unwrap();
    let opts = EngineOptions {
        precision: gpu::Precision::Bf16,
        ..EngineOptions::default()
    };
    engine_with("cuda", &ck.config, ck.params, &opts).unwrap()
}

fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(77);
    [1usize, 7, 3, 30, 2, 11, 5, 64, 4, 9]
        .iter()
        .map(|&n| (0..n).map(|_| rng.below(vocab as u64) as u32).collect())
        .collect()
}

fn run(e: &mut dyn InferenceEngine, s: &Sampling, slots: usize) -> Vec<(Vec<u32>, Stop)> {
    let v = e.config().vocab_size;
    let p = prompts(v);
    let samplers = (0..p.len())
        .map(|i| {
            let mut one = s.clone();
            one.max_new_tokens = 6 + (i * 7) % 19;
            one.seed = 40 + i as u64;
            Sampler::new(&one, v).unwrap()
        })
        .collect();
    generate_batched(e, &p, samplers, slots, true, |_, _| {
        ControlFlow::Continue(())
    })
    .unwrap()
}

#[test]
fn gpu_batched_greedy_answers_are_the_lone_answers() {
    if let Err(e) = gpu::available() {
        println!("skipping gpu_batched_greedy_answers_are_the_lone_answers: {e}");
        return;
    }
    let mut e = engine();
    let v = e.config().vocab_size;
    let s = Sampling {
        temperature: 0.0,
        repetition_penalty: 1.3,
        ..Sampling::default()
    };
    let want: Vec<Vec<u32>> = prompts(v)
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let one = Sampling {
                max_new_tokens: 6 + (i * 7) % 19,
                ..s.clone()
            };
            generate(e.as_mut(), p, &one, |_| {}).unwrap()
        })
        .collect();
    for slots in [1, 3, 8, 10] {
        let got = run(e.as_mut(), &s, slots);
        for (i, ((g, _), w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "sequence {i} at batch {slots}");
        }
    }
    // Draws on the device: the same seeds give the same answers again.
    let s = Sampling {
        temperature: 0.9,
        top_k: 20,
        top_p: 0.95,
        repetition_penalty: 1.1,
        ..Sampling::default()
    };
    let a = run(e.as_mut(), &s, 4);
    assert_eq!(a, run(e.as_mut(), &s, 4));
    assert!(a.iter().flat_map(|x| &x.0).all(|&t| (t as usize) < v));
    let distinct: std::collections::HashSet<&Vec<u32>> = a.iter().map(|x| &x.0).collect();
    assert!(distinct.len() > 1, "every sequence drew the same tokens");
}
