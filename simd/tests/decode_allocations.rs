//! Decoding allocates nothing per token: after the first steps have grown the scratch
//! buffers, `step_into` runs with zero heap allocations, on one thread and on a pool.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use reference::{Engine, MambaConfig, State};
use simd::{SimdEngine, SimdOptions, WeightDtype};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static A: Counting = Counting;

#[test]
fn decode_steps_allocate_nothing() {
    // Big enough that the projections and the scan are split across the pool's threads.
    let cfg = MambaConfig::new(256, 2, 1000);
    let params = reference::init::init_params::<f32>(&cfg, 5);
    for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::Int8] {
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
            let before = ALLOCS.load(Ordering::SeqCst);
            for i in 0..20 {
                tok[0] = (tok[0] * 31 + i) % 1000;
                e.step_into(&tok, None, &mut st, &mut logits).unwrap();
            }
            let n = ALLOCS.load(Ordering::SeqCst) - before;
            assert_eq!(
                n, 0,
                "{dtype:?} on {threads} threads: {n} allocations in 20 decode steps"
            );
            assert!(logits.iter().all(|v| v.is_finite()));
        }
    }
}
