//! Continuous batching (`trainer::batched`): prompts of different lengths, more prompts than
//! rows (finished rows take the next prompt), different token limits per sequence; every
//! sequence draws the tokens a lone run draws, greedy and sampled, at every batch size, on
//! an engine that decodes from host memory and on one that holds the rows (a stand-in for
//! the GPU, with the reference behind `prefill_held_row` / `step_held`).

use std::ops::ControlFlow;

use reference::engine::NamedTensors;
use reference::init::init_params;
use reference::model::Batch;
use reference::rng::Rng;
use reference::{HeldState, InferenceEngine, MambaConfig, ReferenceEngine, Result, State, Tensor};
use trainer::batched::{generate_batched, Batcher};
use trainer::generate::{generate, Sampler, Sampling, Stop};

/// The reference with its rows held "on the device".
struct Holding {
    inner: ReferenceEngine<f32>,
    held: Option<(HeldState, State<f32>)>,
    row_prefills: usize,
}

impl InferenceEngine for Holding {
    fn name(&self) -> String {
        "holding".into()
    }
    fn config(&self) -> &MambaConfig {
        self.inner.config()
    }
    fn forward(&mut self, i: &Batch, s: Option<&State<f32>>) -> Result<(Tensor<f32>, State<f32>)> {
        self.inner.forward(i, s)
    }
    fn step(&mut self, t: &[u32], r: Option<&[bool]>, s: &mut State<f32>) -> Result<Tensor<f32>> {
        self.inner.step(t, r, s)
    }
    fn hold_state(&mut self, state: &State<f32>) -> Result<Option<HeldState>> {
        let t = HeldState {
            id: 7,
            batch: state.batch(),
        };
        self.held = Some((t, state.clone()));
        Ok(Some(t))
    }
    fn step_held(
        &mut self,
        h: HeldState,
        tokens: &[u32],
        resets: Option<&[bool]>,
        logits: &mut [f32],
    ) -> Result<()> {
        let (t, st) = self.held.as_mut().unwrap();
        assert_eq!(*t, h);
        self.inner.step_into(tokens, resets, st, logits)
    }
    fn prefill_held_row(
        &mut self,
        h: HeldState,
        row: usize,
        tokens: &[u32],
        logits: &mut [f32],
    ) -> Result<Option<()>> {
        let mut one = State::zeros(self.inner.config(), 1);
        self.inner.prefill(tokens, &mut one, logits)?;
        let (t, st) = self.held.as_mut().unwrap();
        assert_eq!(*t, h);
        for (dst, src) in [(&mut st.conv, &one.conv), (&mut st.ssm, &one.ssm)] {
            let (layers, batch) = (dst.shape[0], dst.shape[1]);
            let per = src.data.len() / layers;
            for i in 0..layers {
                let at = (i * batch + row) * per;
                dst.data[at..at + per].copy_from_slice(&src.data[i * per..(i + 1) * per]);
            }
        }
        self.row_prefills += 1;
        Ok(Some(()))
    }
    fn parameters(&self) -> Result<NamedTensors> {
        self.inner.parameters()
    }
}

fn cfg() -> MambaConfig {
    MambaConfig::new(24, 2, 41)
}

fn reference_engine() -> ReferenceEngine<f32> {
    ReferenceEngine::new(cfg(), init_params::<f32>(&cfg(), 5))
}

/// Seven prompts of lengths 1 to 12 and each its own sampling (seed, token limit).
fn jobs(base: &Sampling) -> (Vec<Vec<u32>>, Vec<Sampling>) {
    let mut rng = Rng::new(31);
    let v = cfg().vocab_size as u64;
    let lens = [1usize, 5, 2, 12, 3, 9, 4];
    let prompts = lens
        .iter()
        .map(|&n| (0..n).map(|_| rng.below(v) as u32).collect())
        .collect();
    let samplings = (0..lens.len())
        .map(|i| Sampling {
            seed: 100 + i as u64,
            max_new_tokens: 3 + (i * 5) % 9,
            ..base.clone()
        })
        .collect();
    (prompts, samplings)
}

fn lone_runs(e: &mut dyn InferenceEngine, base: &Sampling) -> Vec<Vec<u32>> {
    let (prompts, samplings) = jobs(base);
    prompts
        .iter()
        .zip(&samplings)
        .map(|(p, s)| generate(e, p, s, |_| {}).unwrap())
        .collect()
}

fn batched(e: &mut dyn InferenceEngine, base: &Sampling, slots: usize) -> Vec<(Vec<u32>, Stop)> {
    let (prompts, samplings) = jobs(base);
    let v = cfg().vocab_size;
    let samplers = samplings
        .iter()
        .map(|s| Sampler::new(s, v).unwrap())
        .collect();
    generate_batched(e, &prompts, samplers, slots, true, |_, _| {
        ControlFlow::Continue(())
    })
    .unwrap()
}

fn greedy() -> Sampling {
    Sampling {
        temperature: 0.0,
        repetition_penalty: 1.3,
        ..Sampling::default()
    }
}

fn sampled() -> Sampling {
    Sampling {
        temperature: 0.9,
        top_k: 12,
        top_p: 0.9,
        repetition_penalty: 1.2,
        ..Sampling::default()
    }
}

#[test]
fn batched_answers_are_the_lone_answers_at_every_batch_size() {
    for base in [greedy(), sampled()] {
        let want = lone_runs(&mut reference_engine(), &base);
        let (_, samplings) = jobs(&base);
        for slots in [1, 2, 3, 8] {
            let got = batched(&mut reference_engine(), &base, slots);
            for (i, ((g, why), w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g, w,
                    "sequence {i} at batch {slots} (T {})",
                    base.temperature
                );
                assert_eq!(g.len(), samplings[i].max_new_tokens);
                assert_eq!(*why, Stop::MaxTokens);
            }
        }
    }
}

#[test]
fn held_rows_give_the_lone_answers_and_are_reused() {
    for base in [greedy(), sampled()] {
        let want = lone_runs(&mut reference_engine(), &base);
        for slots in [1, 3] {
            let mut e = Holding {
                inner: reference_engine(),
                held: None,
                row_prefills: 0,
            };
            let got = batched(&mut e, &base, slots);
            let got: Vec<Vec<u32>> = got.into_iter().map(|g| g.0).collect();
            assert_eq!(got, want, "batch {slots}");
            assert_eq!(e.row_prefills, 7, "every prompt prefilled into a row once");
        }
    }
}

#[test]
fn a_stop_token_or_the_caller_ends_one_sequence_and_frees_its_row() {
    let base = greedy();
    let want = lone_runs(&mut reference_engine(), &base);
    let (prompts, mut samplings) = jobs(&base);
    // Sequence 3 stops at its third token; the caller stops sequence 5 after its second.
    samplings[3].stop_token = Some(want[3][2]);
    let stop_at = want[3].iter().position(|&t| t == want[3][2]).unwrap();
    let v = cfg().vocab_size;
    let samplers = samplings
        .iter()
        .map(|s| Sampler::new(s, v).unwrap())
        .collect();
    let mut e = reference_engine();
    let mut seen5 = 0;
    let got = generate_batched(&mut e, &prompts, samplers, 2, false, |i, _| {
        if i == 5 {
            seen5 += 1;
            if seen5 == 2 {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(got[3], (want[3][..=stop_at].to_vec(), Stop::Token));
    assert_eq!(got[5], (want[5][..2].to_vec(), Stop::Caller));
    for i in [0, 1, 2, 4, 6] {
        assert_eq!(got[i].0, want[i], "sequence {i}");
    }
}

#[test]
fn bad_batches_and_prompts_are_errors() {
    let mut e = reference_engine();
    let err = Batcher::new(&mut e, 0).err().unwrap().to_string();
    assert!(err.contains("at least one row"), "{err}");
    let mut b = Batcher::new(&mut e, 1).unwrap();
    let s = Sampler::new(&greedy(), cfg().vocab_size).unwrap();
    let err = b.admit(&mut e, 4, &[], s).unwrap_err().to_string();
    assert!(err.contains("sequence 4") && err.contains("empty"), "{err}");
    let s = Sampler::new(&greedy(), cfg().vocab_size).unwrap();
    b.admit(&mut e, 0, &[1, 2], s).unwrap();
    let s = Sampler::new(&greedy(), cfg().vocab_size).unwrap();
    let err = b.admit(&mut e, 1, &[3], s).unwrap_err().to_string();
    assert!(err.contains("busy"), "{err}");
}
