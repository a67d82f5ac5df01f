//! The linear layer (`nn.Linear`, `y = x · Wᵀ + bias`), the fast CPU twin of
//! `reference::ops::linear`, in two forms:
//! - for inference, [`linear`] over f32, bf16 or int8 weight matrices: row-parallel
//!   matrix-vector products for decoding (a few rows of activations) and `matrixmultiply`
//!   GEMMs for prefill (many rows), dequantising bf16 / int8 weights one block of rows at a
//!   time;
//! - for training, [`linear_fwd`] and [`linear_bwd`] in f32 on [`crate::gemm::sgemm`], over a
//!   given pool.

use rayon::ThreadPool;

use crate::gemm::sgemm;
use crate::kernels::{dot_product_gemm, with_prepared, Isa, MatRef};
use crate::weights::dequant_rows;
use crate::SyncPtr;

/// Rows of activations from which a product runs as a GEMM rather than batched row dot
/// products (a decode step of up to 16 sequences reads each weight once, in its own format).
const GEMM_MIN_ROWS: usize = 17;
/// Columns from which many rows (prefill) run on the integer dot products where
/// [`dot_product_gemm`] allows: shorter rows (dt_proj's, `dt_rank` long) spend more on each
/// output's horizontal sum than on its products, so they take the f32 GEMM.
const DOT_MIN_COLS: usize = 256;
/// Weight rows dequantised at a time for a GEMM: large, so that `matrixmultiply` packs the
/// activations once per block rather than once per few rows.
const GEMM_BLOCK_ROWS: usize = 512;

/// `y[r, o] = Σ_j w[o, j] · x[r, j] + bias[o]` for `x` `[n, d_in]`, `w` `[d_out, d_in]`,
/// `y` `[n, d_out]` (overwritten). Runs on the current rayon pool.
pub fn linear(isa: Isa, w: MatRef, x: &[f32], bias: Option<&[f32]>, d_in: usize, y: &mut [f32]) {
    let n = x.len() / d_in.max(1);
    let d_out = y.len().checked_div(n).unwrap_or(0);
    assert_eq!(x.len(), n * d_in, "linear: x length");
    assert_eq!(y.len(), n * d_out, "linear: y length");
    if n == 0 || d_out == 0 {
        return;
    }
    if n < GEMM_MIN_ROWS || (dot_product_gemm(isa, w) && d_in >= DOT_MIN_COLS) {
        gemv(isa, w, x, d_in, d_out, y);
    } else {
        gemm(w, x, d_in, d_out, y);
    }
    if let Some(b) = bias {
        for yr in y.chunks_mut(d_out) {
            for (v, &bv) in yr.iter_mut().zip(b) {
                *v += bv;
            }
        }
    }
}

/// Batched row dot products, weight rows split across threads; each weight tile is read once
/// for all `n` activation rows, which are converted once for the kernels (int8 on VNNI, int4 too).
fn gemv(isa: Isa, w: MatRef, x: &[f32], d_in: usize, d_out: usize, y: &mut [f32]) {
    let threads = crate::threads();
    let n = x.len() / d_in;
    // Below ~256 K multiply-adds (x_proj, dt_proj at batch 1) waking a second thread costs
    // more than it saves. Many rows (`dot_product_gemm`: prefill): blocks of 64 weight rows, which
    // stay in L2 while the blocks of activations pass over them.
    let chunk = if threads == 1 || n * d_out * d_in < 1 << 18 {
        d_out
    } else if n >= GEMM_MIN_ROWS {
        64
    } else {
        d_out.div_ceil(threads * 4).max(16)
    };
    let yp = SyncPtr::new(y);
    with_prepared(isa, w, x, d_in, |p| {
        let job = |ci: usize| {
            let r0 = ci * chunk;
            let r1 = (r0 + chunk).min(d_out);
            // SAFETY: row `b`, columns `r0..r1` of `y` belong to this chunk only and are in
            // bounds (`y` is `[n, d_out]`, asserted by the caller); `y` itself is not used
            // while the jobs run.
            let mut put = |b: usize, i: usize, v: f32| unsafe { yp.write(b * d_out + r0 + i, v) };
            p.dot_rows(r0, r1 - r0, &mut put);
        };
        crate::par_for(d_out.div_ceil(chunk), job);
    });
}

/// GEMM through `matrixmultiply`, output columns split across threads.
fn gemm(w: MatRef, x: &[f32], d_in: usize, d_out: usize, y: &mut [f32]) {
    let n = x.len() / d_in;
    let threads = crate::threads();
    // Two column blocks per thread: a thread slowed by other load leaves work to steal, while
    // each block's GEMM still amortises its packing of `x`.
    let per = d_out.div_ceil(2 * threads).max(128.min(d_out));
    let yp = SyncPtr::new(y);
    let job = |ti: usize| {
        let (r0, r1) = (ti * per, ((ti + 1) * per).min(d_out));
        let mut scratch = Vec::new();
        let mut o = r0;
        while o < r1 {
            let take = (r1 - o).min(if matches!(w, MatRef::F32(_)) {
                r1 - o
            } else {
                GEMM_BLOCK_ROWS
            });
            let wp: *const f32 = match w {
                MatRef::F32(d) => d[o * d_in..].as_ptr(),
                _ => {
                    scratch.resize(take * d_in, 0.0);
                    dequant_rows(w, d_in, o, &mut scratch);
                    scratch.as_ptr()
                }
            };
            // SAFETY: A = x `[n, d_in]`, B = rows `o..o + take` of w seen as `[d_in, take]`
            // (row stride 1, column stride d_in), C = columns `o..o + take` of y `[n, d_out]`;
            // all in bounds, and C's columns belong to this thread only.
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    d_in,
                    take,
                    1.0,
                    x.as_ptr(),
                    d_in as isize,
                    1,
                    wp,
                    1,
                    d_in as isize,
                    0.0,
                    yp.at(o),
                    d_out as isize,
                    1,
                );
            }
            o += take;
        }
    };
    crate::par_for(d_out.div_ceil(per), job);
}

/// `y = x · Wᵀ + bias` into `y` `[n, d_out]`: `x` `[n, d_in]`, `w` `[d_out, d_in]`,
/// `bias` `[d_out]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd_into(
    pool: &ThreadPool,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    d_in: usize,
    d_out: usize,
    y: &mut [f32],
) {
    assert!(
        x.len() == n * d_in
            && w.len() == d_out * d_in
            && y.len() == n * d_out
            && bias.is_none_or(|b| b.len() == d_out),
        "linear_fwd: x {} / w {} / y {} / bias {:?} values, expected [n, d_in] = [{n}, {d_in}], \
         [d_out, d_in] = [{d_out}, {d_in}], [n, d_out], [d_out]",
        x.len(),
        w.len(),
        y.len(),
        bias.map(|b| b.len())
    );
    let beta = match bias {
        Some(b) => {
            for row in y.chunks_exact_mut(d_out) {
                row.copy_from_slice(b);
            }
            1.0
        }
        None => 0.0,
    };
    sgemm(
        pool, n, d_in, d_out, 1.0, x, d_in, 1, w, 1, d_in, beta, y, d_out, 1,
    );
}

/// `x · Wᵀ + bias` as a new `[n, d_out]` buffer; see [`linear_fwd_into`].
pub fn linear_fwd(
    pool: &ThreadPool,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    d_in: usize,
    d_out: usize,
) -> Vec<f32> {
    let mut y = vec![0.0; n * d_out];
    linear_fwd_into(pool, x, w, bias, n, d_in, d_out, &mut y);
    y
}

/// `grad_w[d_out, d_in] += dyᵀ · x` for `dy` `[n, d_out]`, `x` `[n, d_in]`.
pub fn linear_bwd_weight(
    pool: &ThreadPool,
    x: &[f32],
    dy: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
    grad_w: &mut [f32],
) {
    assert!(
        x.len() == n * d_in && dy.len() == n * d_out && grad_w.len() == d_out * d_in,
        "linear_bwd_weight: x {} / dy {} / grad_w {} values, expected [{n}, {d_in}], [{n}, {d_out}], [{d_out}, {d_in}]",
        x.len(),
        dy.len(),
        grad_w.len()
    );
    sgemm(
        pool, d_out, n, d_in, 1.0, dy, 1, d_out, x, d_in, 1, 1.0, grad_w, d_in, 1,
    );
}

/// `grad_bias[o] += Σ_r dy[r, o]`, rows in increasing order.
pub fn linear_bwd_bias(dy: &[f32], n: usize, d_out: usize, grad_bias: &mut [f32]) {
    assert!(
        dy.len() == n * d_out && grad_bias.len() == d_out,
        "linear_bwd_bias: dy {} / grad_bias {} values, expected [{n}, {d_out}], [{d_out}]",
        dy.len(),
        grad_bias.len()
    );
    for row in dy.chunks_exact(d_out) {
        for (g, &d) in grad_bias.iter_mut().zip(row) {
            *g += d;
        }
    }
}

/// `dx[n, d_in] = dy · W` for `dy` `[n, d_out]`, `w` `[d_out, d_in]`, into `dx` (overwritten).
pub fn linear_bwd_input_into(
    pool: &ThreadPool,
    w: &[f32],
    dy: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
    dx: &mut [f32],
) {
    assert!(
        w.len() == d_out * d_in && dy.len() == n * d_out && dx.len() == n * d_in,
        "linear_bwd_input: w {} / dy {} / dx {} values, expected [{d_out}, {d_in}], [{n}, {d_out}], [{n}, {d_in}]",
        w.len(),
        dy.len(),
        dx.len()
    );
    sgemm(
        pool, n, d_out, d_in, 1.0, dy, d_out, 1, w, d_in, 1, 0.0, dx, d_in, 1,
    );
}

/// Backward of [`linear_fwd`], as `reference::ops::linear::linear_bwd`: accumulates
/// `grad_w += dyᵀ · x` and `grad_bias += Σ_r dy`, returns `dx = dy · W`.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd(
    pool: &ThreadPool,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    n: usize,
    d_in: usize,
    d_out: usize,
    grad_w: &mut [f32],
    grad_bias: Option<&mut [f32]>,
) -> Vec<f32> {
    linear_bwd_weight(pool, x, dy, n, d_in, d_out, grad_w);
    if let Some(gb) = grad_bias {
        linear_bwd_bias(dy, n, d_out, gb);
    }
    let mut dx = vec![0.0; n * d_in];
    linear_bwd_input_into(pool, w, dy, n, d_in, d_out, &mut dx);
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_rng::{lcg, pool, vals};
    use crate::weights::Mat;
    use crate::WeightDtype;

    /// Both product paths (few rows: dot products; many rows: GEMM), every storage format,
    /// against f64 sums over the dequantised weights, on one and on two threads.
    #[test]
    fn linear_matches_f64_on_both_paths() {
        let mut s = 11u64;
        for &(n, d_in, d_out) in &[
            (1, 33, 300),
            (3, 17, 5),
            (7, 64, 129),
            (16, 40, 70),
            (40, 9, 513),
            (20, 300, 37),
        ] {
            let w: Vec<f32> = (0..d_out * d_in).map(|_| lcg(&mut s)).collect();
            let x: Vec<f32> = (0..n * d_in).map(|_| lcg(&mut s)).collect();
            let bias: Vec<f32> = (0..d_out).map(|_| lcg(&mut s)).collect();
            for dt in [
                WeightDtype::F32,
                WeightDtype::Bf16,
                WeightDtype::Int8,
                WeightDtype::Int4,
            ] {
                let m = Mat::from_f32(d_out, d_in, w.clone(), dt);
                let wd = m.to_f32();
                for threads in [1, 2] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut y = vec![f32::NAN; n * d_out];
                    let isa = Isa::detect();
                    pool.install(|| linear(isa, m.view(), &x, Some(&bias), d_in, &mut y));
                    // The f32 GEMM (many rows) multiplies `x` itself.
                    let dots = dot_product_gemm(isa, m.view()) && d_in >= DOT_MIN_COLS;
                    let x = if n >= GEMM_MIN_ROWS && !dots {
                        x.clone()
                    } else {
                        crate::kernels::tests::seen_x(isa, dt.name(), &x, d_in)
                    };
                    for r in 0..n {
                        for o in 0..d_out {
                            let want: f64 = (0..d_in)
                                .map(|j| wd[o * d_in + j] as f64 * x[r * d_in + j] as f64)
                                .sum::<f64>()
                                + bias[o] as f64;
                            let got = y[r * d_out + o] as f64;
                            assert!(
                                (got - want).abs()
                                    < 1e-5 * (1.0 + want.abs()) * (d_in as f64).sqrt(),
                                "{dt:?} n {n} [{r},{o}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn linear_bwd_matches_its_definition() {
        let (n, d_in, d_out) = (37, 19, 23);
        let p = pool(2);
        let x = vals(n * d_in, 3);
        let w = vals(d_out * d_in, 4);
        let dy = vals(n * d_out, 5);
        let b = vals(d_out, 6);
        let y = linear_fwd(&p, &x, &w, Some(&b), n, d_in, d_out);
        let mut gw = vals(d_out * d_in, 7);
        let gw0 = gw.clone();
        let mut gb = vec![0.5f32; d_out];
        let dx = linear_bwd(&p, &x, &w, &dy, n, d_in, d_out, &mut gw, Some(&mut gb));
        for r in 0..n {
            for o in 0..d_out {
                let s: f64 = (0..d_in)
                    .map(|j| w[o * d_in + j] as f64 * x[r * d_in + j] as f64)
                    .sum();
                assert!((y[r * d_out + o] as f64 - s - b[o] as f64).abs() < 1e-5);
            }
            for j in 0..d_in {
                let s: f64 = (0..d_out)
                    .map(|o| w[o * d_in + j] as f64 * dy[r * d_out + o] as f64)
                    .sum();
                assert!((dx[r * d_in + j] as f64 - s).abs() < 1e-5);
            }
        }
        for o in 0..d_out {
            let sb: f64 = (0..n).map(|r| dy[r * d_out + o] as f64).sum();
            assert!((gb[o] as f64 - 0.5 - sb).abs() < 1e-5);
            for j in 0..d_in {
                let s: f64 = (0..n)
                    .map(|r| dy[r * d_out + o] as f64 * x[r * d_in + j] as f64)
                    .sum();
                assert!((gw[o * d_in + j] as f64 - gw0[o * d_in + j] as f64 - s).abs() < 1e-5);
            }
        }
    }
}
