//! The decode loop allocates nothing per token: [`Generator::run`] with every sampler setting,
//! on the simd engine with one thread (which then runs every step on the caller's thread and
//! allocates nothing), under a global allocator that counts this thread's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ops::ControlFlow;

use reference::{DecodeState, State};
use simd::{SimdEngine, SimdOptions};
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

#[test]
fn the_decode_loop_allocates_nothing_per_token() {
    let ck = checkpoint::load(&fixtures::tiny_checkpoint()).unwrap();
    let (cfg, vocab) = (ck.config.clone(), ck.config.vocab_size);
    let opts = SimdOptions {
        threads: 1,
        ..Default::default()
    };
    let mut engine = SimdEngine::new(ck.config, ck.params, &opts).unwrap();
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
            let mut g = Generator::new(&s, vocab).unwrap();
            let mut state = DecodeState::new(&mut engine, State::zeros(&cfg, 1)).unwrap();
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
