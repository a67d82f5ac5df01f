//! # simd — the fast CPU tier
//!
//! Implements [`reference::InferenceEngine`] and [`reference::TrainingEngine`] with `wide` vectors, `matrixmultiply` GEMMs and a thread
//! pool. Inference weights can be f32, bf16, int8 (per-row scales) or int4 (per-group scales);
//! training runs in f32.

pub mod backward;
pub mod gemm;
pub mod loss;
pub mod ops;
pub mod optim;

pub mod engine;
pub mod forward;
pub mod kernels;
pub mod load;
pub mod model;
mod team;
pub mod vecmath;
#[cfg(target_arch = "x86_64")]
pub(crate) mod vecmath512;
pub mod weights;

pub use engine::SimdEngine;
pub use kernels::Isa;

use std::str::FromStr;

/// How the large matrices (embedding, projections, lm_head) are stored for inference.
/// Conv weights, `A_log`, `D`, norms and the dt bias always stay f32, and so do the states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightDtype {
    #[default]
    F32,
    Bf16,
    /// Symmetric int8 with one f32 scale per output row.
    Int8,
    /// Symmetric int4 with one f32 scale per group of 32 along each row.
    Int4,
}

impl WeightDtype {
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::Int8 => "int8",
            WeightDtype::Int4 => "int4",
        }
    }
}

impl FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(WeightDtype::F32),
            "bf16" => Ok(WeightDtype::Bf16),
            "int8" => Ok(WeightDtype::Int8),
            "int4" => Ok(WeightDtype::Int4),
            o => Err(format!(
                "unknown weight dtype `{o}` (expected f32, bf16, int8 or int4)"
            )),
        }
    }
}

/// Options of a [`SimdEngine`].
#[derive(Clone, Debug, Default)]
pub struct SimdOptions {
    /// Worker threads; 0 = one per available core.
    pub threads: usize,
    pub dtype: WeightDtype,
    /// Force an instruction set (tests); `None` = the best this CPU has.
    pub isa: Option<Isa>,
}

/// Whether this tier can run here, and with which instruction set.
pub fn available() -> Result<Isa, &'static str> {
    Ok(Isa::detect())
}

thread_local! {
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Threads the current call may split work over: 1 inside [`serial`], else the current
/// rayon pool's.
pub(crate) fn threads() -> usize {
    if SERIAL.with(|s| s.get()) {
        1
    } else if let Some(m) = team::members() {
        m
    } else {
        rayon::current_num_threads()
    }
}

/// Runs `f(i)` for every `i < n`, split over the threads: the spinning team of a decode step
/// where this thread leads one (`team`), else the current rayon pool. Each task must write
/// its own elements; then the results do not depend on which thread ran what.
pub(crate) fn par_for(n: usize, f: impl Fn(usize) + Sync + Send) {
    if n <= 1 || SERIAL.with(|s| s.get()) {
        (0..n).for_each(f);
    } else if !team::run(n, &f) {
        use rayon::prelude::*;
        (0..n).into_par_iter().for_each(f);
    }
}

/// Runs `f` on this thread with every split of work turned off (see [`threads`]).
pub(crate) fn serial<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            SERIAL.with(|s| s.set(self.0));
        }
    }
    let _reset = Reset(SERIAL.with(|s| s.replace(true)));
    f()
}

/// Seeded values for unit tests.
#[cfg(test)]
pub(crate) mod test_rng {
    /// The next value in [-1, 1) of a 64-bit LCG.
    pub fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// A pool of `t` threads.
    pub fn pool(t: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
    }

    /// Deterministic values in [-1, 1).
    pub fn vals(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }
}

/// A buffer shared by pool tasks that write disjoint elements of it: a raw pointer and the
/// length, so that the slices it hands out are bounds-checked.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SyncPtr<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: every user hands each task a disjoint set of indices (stated at each use), so no
// element is accessed by two threads, and the buffer outlives the tasks.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T: Copy> SyncPtr<T> {
    pub(crate) fn new(s: &mut [T]) -> Self {
        SyncPtr {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// # Safety
    /// No other thread touches element `i` meanwhile.
    #[inline(always)]
    pub(crate) unsafe fn read(self, i: usize) -> T {
        debug_assert!(i < self.len);
        *self.ptr.add(i)
    }

    /// # Safety
    /// As for [`SyncPtr::read`].
    #[inline(always)]
    pub(crate) unsafe fn write(self, i: usize, v: T) {
        debug_assert!(i < self.len);
        *self.ptr.add(i) = v;
    }

    /// The address of element `i` (for APIs that take raw pointers).
    ///
    /// # Safety
    /// `i` is in bounds.
    #[inline(always)]
    pub(crate) unsafe fn at(self, i: usize) -> *mut T {
        debug_assert!(i <= self.len);
        self.ptr.add(i)
    }

    /// `len` elements from `i` as a slice (bounds-checked).
    ///
    /// # Safety
    /// Nothing else reads or writes these elements while the slice lives, and the buffer
    /// given to [`SyncPtr::new`] neither moves nor is used otherwise meanwhile.
    #[inline(always)]
    pub(crate) unsafe fn slice_mut<'a>(self, i: usize, len: usize) -> &'a mut [T] {
        assert!(i + len <= self.len, "SyncPtr: {i} + {len} > {}", self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(i), len)
    }

    /// # Safety
    /// As for [`SyncPtr::slice_mut`].
    #[inline(always)]
    pub(crate) unsafe fn write_slice(self, i: usize, v: &[T]) {
        self.slice_mut(i, v.len()).copy_from_slice(v);
    }
}
