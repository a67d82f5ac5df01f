//! f32 GEMM on a thread pool (the `nn.Linear` forward / backward on it are in
//! [`crate::ops::linear`]).
//!
//! [`sgemm`] computes `C = alpha · A · B + beta · C` for strided `A` `[m, k]`, `B` `[k, n]` and
//! `C` `[m, n]` (row stride, column stride per matrix, so a transpose is just swapped strides).
//! It cuts `C` into blocks of rows (or of columns, whichever dimension is longer) and runs
//! single-threaded `matrixmultiply::sgemm` on each block in the pool. Every element of `C` is
//! computed by exactly one call over the full `k`, so the result does not depend on the thread
//! count. Small products run on the calling thread.

use crate::SyncPtr;
use rayon::ThreadPool;

/// Below this many multiply-adds (`m · k · n`) a product runs on the calling thread.
const PAR_MIN_FLOPS: usize = 1 << 16;

/// Blocks of C per pool thread.
const BLOCKS_PER_THREAD: usize = 4;

/// Blocks are multiples of this many rows / columns (the microkernel's tile edge).
const TILE: usize = 16;

/// Largest index `(rows − 1) · rs + (cols − 1) · cs` of a strided matrix, plus one.
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `C = alpha · A · B + beta · C` with `A` `[m, k]` (strides `rsa`, `csa`), `B` `[k, n]`
/// (`rsb`, `csb`) and `C` `[m, n]` (`rsc`, `csc`), threaded over blocks of `C` on `pool`.
/// With `beta = 0`, `C` is not read. Panics when a slice is too short for its shape and strides
/// or when `C`'s strides make two elements share memory.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    pool: &ThreadPool,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    rsa: usize,
    csa: usize,
    b: &[f32],
    rsb: usize,
    csb: usize,
    beta: f32,
    c: &mut [f32],
    rsc: usize,
    csc: usize,
) {
    assert!(
        a.len() >= extent(m, k, rsa, csa)
            && b.len() >= extent(k, n, rsb, csb)
            && c.len() >= extent(m, n, rsc, csc),
        "sgemm: slices of {} / {} / {} values are too short for A [{m}, {k}] strides ({rsa}, {csa}), \
         B [{k}, {n}] ({rsb}, {csb}), C [{m}, {n}] ({rsc}, {csc})",
        a.len(),
        b.len(),
        c.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    // No two elements of C may share memory (then any split of C writes disjoint memory).
    assert!(
        m == 1 || n == 1 || rsc > (n - 1) * csc || csc > (m - 1) * rsc,
        "sgemm: elements of C overlap (rsc {rsc}, csc {csc}, [{m}, {n}])"
    );
    let by_rows = m >= n;
    let len = if by_rows { m } else { n };
    let threads = pool.current_num_threads().max(1);
    // A few blocks per thread, so that a thread slowed by other work on the machine does not
    // hold the others up (each block repacks the shared operand, a small cost next to its
    // products).
    let blocks = if threads == 1 || m.saturating_mul(k).saturating_mul(n) < PAR_MIN_FLOPS {
        1
    } else {
        (BLOCKS_PER_THREAD * threads).min(len.div_ceil(TILE)).max(1)
    };
    let per = len.div_ceil(blocks).div_ceil(TILE) * TILE;
    let cp = SyncPtr::new(c);
    let run = |start: usize, cp: SyncPtr<f32>| {
        let end = (start + per).min(len);
        let cnt = end - start;
        // SAFETY: the asserts above keep every index inside `a`, `b` and `c`; the block
        // [start, end) of rows (or columns) of C is written by this call alone, and no other
        // reference to `c` is used while the calls run. `cp` points to `c`, borrowed mutably
        // for the whole function.
        unsafe {
            if by_rows {
                matrixmultiply::sgemm(
                    cnt,
                    k,
                    n,
                    alpha,
                    a.as_ptr().add(start * rsa),
                    rsa as isize,
                    csa as isize,
                    b.as_ptr(),
                    rsb as isize,
                    csb as isize,
                    beta,
                    cp.at(start * rsc),
                    rsc as isize,
                    csc as isize,
                );
            } else {
                matrixmultiply::sgemm(
                    m,
                    k,
                    cnt,
                    alpha,
                    a.as_ptr(),
                    rsa as isize,
                    csa as isize,
                    b.as_ptr().add(start * csb),
                    rsb as isize,
                    csb as isize,
                    beta,
                    cp.at(start * csc),
                    rsc as isize,
                    csc as isize,
                );
            }
        }
    };
    if blocks == 1 {
        run(0, cp);
        return;
    }
    pool.scope(|s| {
        let run = &run;
        for start in (per..len).step_by(per) {
            s.spawn(move |_| run(start, cp));
        }
        run(0, cp);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::{pool, vals};

    fn naive(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for l in 0..k {
                    c[i * n + j] += a[i * k + l] as f64 * b[l * n + j] as f64;
                }
            }
        }
        c
    }

    #[test]
    fn sgemm_matches_naive_for_odd_shapes_and_thread_counts() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (67, 33, 129),
            (130, 17, 5),
            (5, 40, 300),
        ] {
            let a = vals(m * k, 1);
            let b = vals(k * n, 2);
            let want = naive(m, k, n, &a, &b);
            let mut first: Option<Vec<f32>> = None;
            for t in [1, 2, 3] {
                let mut c = vec![f32::NAN; m * n];
                sgemm(
                    &pool(t),
                    m,
                    k,
                    n,
                    1.0,
                    &a,
                    k,
                    1,
                    &b,
                    n,
                    1,
                    0.0,
                    &mut c,
                    n,
                    1,
                );
                for (g, w) in c.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5 * (k as f64),
                        "{m}x{k}x{n}: {g} vs {w}"
                    );
                }
                // Transposed C (column-major) gives the same values.
                let mut ct = vec![0.0f32; m * n];
                sgemm(
                    &pool(t),
                    m,
                    k,
                    n,
                    1.0,
                    &a,
                    k,
                    1,
                    &b,
                    n,
                    1,
                    0.0,
                    &mut ct,
                    1,
                    m,
                );
                for i in 0..m {
                    for j in 0..n {
                        assert_eq!(ct[j * m + i].to_bits(), c[i * n + j].to_bits());
                    }
                }
                match &first {
                    None => first = Some(c),
                    Some(f) => assert_eq!(f, &c, "thread count changed the bits"),
                }
            }
        }
    }
}
