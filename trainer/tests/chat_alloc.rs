//! The decode loop allocates nothing per token: [`Generator::run`] with every sampler setting,
//! on an engine whose `step_into` does not allocate, under a counting global allocator (its
//! own test binary, so the allocator counts nothing else).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ops::ControlFlow;

use reference::engine::{LossOutput, NamedTensors, OptimizerState};
use reference::model::Batch;
use reference::optim::StepStats;
use reference::{AdamWConfig, Engine, MambaConfig, State, Tensor};
use trainer::checkpoint;
use trainer::generate::{Generator, Sampling};

// ---- allocation counting (for the allocation-free decode loop) ----

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

/// The system allocator, counting allocations per thread.
struct Counting;

fn count() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every call forwards to `System` with the caller's arguments unchanged; counting
// touches only a const-initialised thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> u64 {
    ALLOCS.with(|c| c.get())
}

fn greedy(max_new_tokens: usize) -> Sampling {
    Sampling {
        max_new_tokens,
        ..Sampling::default()
    }
}

/// An engine whose `step_into` allocates nothing: logits are a hash of the token, the
/// position and the vocabulary index.
struct NoAllocEngine {
    cfg: MambaConfig,
}

impl NoAllocEngine {
    fn fill(&self, token: u32, state: &mut State<f32>, logits: &mut [f32]) {
        state.ssm.data[0] += 1.0;
        let pos = state.ssm.data[0] as u64;
        for (i, l) in logits.iter_mut().enumerate() {
            let h = reference::rng::fnv1a64_bytes(&[(token as u64 ^ pos ^ i as u64) as u8]);
            *l = (h % 1000) as f32 / 100.0 + (i % 7) as f32;
        }
    }
}

impl Engine for NoAllocEngine {
    fn name(&self) -> String {
        "no-alloc".into()
    }
    fn config(&self) -> &MambaConfig {
        &self.cfg
    }
    fn forward(
        &mut self,
        _: &Batch,
        _: Option<&State<f32>>,
    ) -> reference::Result<(Tensor<f32>, State<f32>)> {
        unimplemented!("the decode loop uses prefill and step_into only")
    }
    fn loss_and_backward(
        &mut self,
        _: &Batch,
        _: &[u32],
        _: Option<&[bool]>,
        _: Option<&State<f32>>,
        _: f64,
    ) -> reference::Result<LossOutput> {
        unimplemented!()
    }
    fn zero_grad(&mut self) {}
    fn optimizer_step(&mut self, _: &AdamWConfig, _: f64) -> reference::Result<StepStats> {
        unimplemented!()
    }
    fn step(
        &mut self,
        _: &[u32],
        _: Option<&[bool]>,
        _: &mut State<f32>,
    ) -> reference::Result<Tensor<f32>> {
        unimplemented!("the decode loop uses step_into")
    }
    fn step_into(
        &mut self,
        tokens: &[u32],
        _: Option<&[bool]>,
        state: &mut State<f32>,
        logits: &mut [f32],
    ) -> reference::Result<()> {
        self.fill(tokens[0], state, logits);
        Ok(())
    }
    fn prefill(
        &mut self,
        tokens: &[u32],
        state: &mut State<f32>,
        logits: &mut [f32],
    ) -> reference::Result<()> {
        for &t in tokens {
            self.fill(t, state, logits);
        }
        Ok(())
    }
    fn parameters(&self) -> NamedTensors {
        Vec::new()
    }
    fn set_parameters(&mut self, _: &[(String, Tensor<f32>)]) -> reference::Result<()> {
        Ok(())
    }
    fn gradients(&self) -> NamedTensors {
        Vec::new()
    }
    fn optimizer_state(&self) -> OptimizerState {
        unimplemented!()
    }
    fn set_optimizer_state(&mut self, _: &OptimizerState) -> reference::Result<()> {
        Ok(())
    }
}

#[test]
fn the_decode_loop_allocates_nothing_per_token() {
    let mut cfg = checkpoint::load(&fixtures::tiny_checkpoint())
        .unwrap()
        .config;
    cfg.vocab_size = 1000;
    let mut engine = NoAllocEngine { cfg: cfg.clone() };
    let samplings = [
        greedy(0),
        Sampling {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            repetition_penalty: 1.1,
            seed: 3,
            ..greedy(0)
        },
        Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 4,
            ..greedy(0)
        },
        Sampling {
            temperature: 1.0,
            seed: 5,
            ..greedy(0)
        },
    ];
    for s in samplings {
        for n in [8, 200] {
            let s = Sampling {
                max_new_tokens: n,
                ..s.clone()
            };
            let mut g = Generator::new(&s, 1000).unwrap();
            let mut state = State::zeros(&cfg, 1);
            g.prefill(&mut engine, &[1, 2, 3], &mut state).unwrap();
            g.sampler.observe(&[1, 2, 3]);
            let before = allocations();
            let mut seen = 0;
            g.run(&mut engine, &mut state, |_| {
                seen += 1;
                ControlFlow::Continue(())
            })
            .unwrap();
            let during = allocations() - before;
            assert_eq!(seen, n);
            assert_eq!(during, 0, "{n} tokens with {s:?}: {during} allocations");
        }
    }
}
