//! Decoding allocates nothing per token: after the first steps have grown the scratch
//! buffers, `step_into` runs with zero heap allocations on one thread (counted on that
//! thread), and on a pool only rayon's amortised job-queue blocks (counted on every thread).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use reference::{InferenceEngine, MambaConfig, State};
use simd::{SimdEngine, SimdOptions, WeightDtype};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    static MINE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn count() {
    ALLOCS.fetch_add(1, Ordering::SeqCst);
    let _ = MINE.try_with(|c| c.set(c.get() + 1));
}

/// Allocations on every thread, and on this one.
fn counts() -> (usize, usize) {
    (ALLOCS.load(Ordering::SeqCst), MINE.with(|c| c.get()))
}

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Long enough to cross rayon's job-queue block size (63) many times over.
const STEPS: u32 = 200;
/// Parallel regions per decode step of the test model: install + in_proj, out_proj and the
/// lm_head per layer (2 layers) — an upper bound.
const JOBS_PER_STEP: usize = 8;

#[test]
fn decode_steps_allocate_nothing() {
    // Big enough that the projections and the scan are split across the pool's threads.
    let cfg = MambaConfig::new(256, 2, 1000);
    let params = reference::init::init_params::<f32>(&cfg, 5);
    // Engines stay alive to the end: a dropped pool's threads wind down (and free memory)
    // while the next case is being counted.
    let mut keep = Vec::new();
    for dtype in [
        WeightDtype::F32,
        WeightDtype::Bf16,
        WeightDtype::Int8,
        WeightDtype::Int4,
    ] {
        for threads in [1, 2] {
            let o = SimdOptions {
                threads,
                dtype,
                isa: None,
            };
            let mut e = SimdEngine::new(cfg.clone(), params.clone(), &o).unwrap();
            let mut st = State::zeros(&cfg, 1);
            let mut logits = vec![0f32; cfg.vocab_size];
            let mut tok = [17u32];
            for _ in 0..3 {
                e.step_into(&tok, None, &mut st, &mut logits).unwrap();
            }
            let before = counts();
            for i in 0..STEPS {
                tok[0] = (tok[0] * 31 + i) % 1000;
                e.step_into(&tok, None, &mut st, &mut logits).unwrap();
            }
            let after = counts();
            // One thread runs the step on this thread: count here, exactly (other threads,
            // such as idle pools winding down, cannot disturb it).
            let n = if threads == 1 {
                after.1 - before.1
            } else {
                after.0 - before.0
            };
            // One thread: nothing at all. A pool: the engine itself allocates nothing, but
            // each step hands rayon a few jobs and rayon's job queue (crossbeam's Injector)
            // grows one block per 63 jobs pushed — amortised, not per token.
            let limit = if threads == 1 {
                0
            } else {
                STEPS as usize * JOBS_PER_STEP / 63 + 1
            };
            assert!(
                n <= limit,
                "{dtype:?} on {threads} threads: {n} allocations in {STEPS} decode steps (limit {limit})"
            );
            assert!(logits.iter().all(|v| v.is_finite()));
            keep.push(e);
        }
    }
}
