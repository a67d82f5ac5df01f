//! Weight matrices in f32, bf16 or int8, owned or memory-mapped, and the matrix products the
//! forward needs: row-parallel matrix-vector products for decoding (a few rows of activations)
//! and `matrixmultiply` GEMMs for prefill (many rows), dequantising bf16 / int8 weights one
//! block of rows at a time.

use std::sync::Arc;

use memmap2::Mmap;
use rayon::prelude::*;

use crate::kernels::{bf16_to_f32, dot_rows, f32_to_bf16, quantize_row, Isa, MatRef};
use crate::{SyncPtr, WeightDtype};

/// Rows of activations from which a product runs as a GEMM rather than row dot products.
const GEMM_MIN_ROWS: usize = 6;
/// Weight rows dequantised at a time for a GEMM.
const GEMM_BLOCK_ROWS: usize = 128;

/// Values that live either in memory we own or inside a memory-mapped checkpoint.
#[derive(Debug)]
pub enum Buf<T: 'static> {
    Owned(Vec<T>),
    /// `len` values at byte `offset` of the map; the offset is aligned for `T`.
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
}

impl<T: Copy + 'static> Buf<T> {
    /// Borrows the mapped bytes as `T` when they are aligned; `None` otherwise (copy instead).
    pub fn mapped(map: &Arc<Mmap>, offset: usize, len: usize) -> Option<Buf<T>> {
        let bytes = map.get(offset..offset + len * std::mem::size_of::<T>())?;
        (bytes.as_ptr() as usize)
            .is_multiple_of(std::mem::align_of::<T>())
            .then(|| Buf::Mapped {
                map: map.clone(),
                offset,
                len,
            })
    }

    pub fn as_slice(&self) -> &[T] {
        match self {
            Buf::Owned(v) => v,
            Buf::Mapped { map, offset, len } => {
                let p = map[*offset..].as_ptr();
                // SAFETY: `mapped` checked bounds and alignment; T is f32/u16/i8, for which
                // every bit pattern is valid; the map lives as long as `self`.
                unsafe { std::slice::from_raw_parts(p as *const T, *len) }
            }
        }
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self, Buf::Mapped { .. })
    }
}

/// A weight matrix `[rows, cols]`, row-major.
#[derive(Debug)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: MatData,
}

#[derive(Debug)]
pub enum MatData {
    F32(Buf<f32>),
    Bf16(Buf<u16>),
    Int8 { q: Buf<i8>, scales: Vec<f32> },
}

impl Mat {
    /// Stores f32 values in `dtype` (rounding to bf16, or quantising rows to int8).
    pub fn from_f32(rows: usize, cols: usize, w: Vec<f32>, dtype: WeightDtype) -> Mat {
        let data = match dtype {
            WeightDtype::F32 => MatData::F32(Buf::Owned(w)),
            WeightDtype::Bf16 => {
                MatData::Bf16(Buf::Owned(w.iter().map(|&v| f32_to_bf16(v)).collect()))
            }
            WeightDtype::Int8 => {
                let mut q = vec![0i8; rows * cols];
                let scales = (0..rows)
                    .map(|r| {
                        quantize_row(
                            &w[r * cols..(r + 1) * cols],
                            &mut q[r * cols..(r + 1) * cols],
                        )
                    })
                    .collect();
                MatData::Int8 {
                    q: Buf::Owned(q),
                    scales,
                }
            }
        };
        Mat { rows, cols, data }
    }

    pub fn view(&self) -> MatRef<'_> {
        match &self.data {
            MatData::F32(b) => MatRef::F32(b.as_slice()),
            MatData::Bf16(b) => MatRef::Bf16(b.as_slice()),
            MatData::Int8 { q, scales } => MatRef::Int8 {
                q: q.as_slice(),
                scales,
            },
        }
    }

    /// The values as f32 (dequantised): what the matrix computes with.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        dequant_rows(self.view(), self.cols, 0, &mut out);
        out
    }

    /// Bytes of weight data read per use (the decode bandwidth cost).
    pub fn bytes(&self) -> usize {
        match &self.data {
            MatData::F32(_) => self.rows * self.cols * 4,
            MatData::Bf16(_) => self.rows * self.cols * 2,
            MatData::Int8 { .. } => self.rows * self.cols + self.rows * 4,
        }
    }

    pub fn is_mapped(&self) -> bool {
        match &self.data {
            MatData::F32(b) => b.is_mapped(),
            MatData::Bf16(b) => b.is_mapped(),
            MatData::Int8 { q, .. } => q.is_mapped(),
        }
    }
}

/// Rows `r0..r1` of a matrix with `cols` columns.
pub fn sub_rows(w: MatRef<'_>, cols: usize, r0: usize, r1: usize) -> MatRef<'_> {
    match w {
        MatRef::F32(d) => MatRef::F32(&d[r0 * cols..r1 * cols]),
        MatRef::Bf16(d) => MatRef::Bf16(&d[r0 * cols..r1 * cols]),
        MatRef::Int8 { q, scales } => MatRef::Int8 {
            q: &q[r0 * cols..r1 * cols],
            scales: &scales[r0..r1],
        },
    }
}

/// Writes rows `r0..` of `w` (as many as `out` holds) as f32.
pub fn dequant_rows(w: MatRef, cols: usize, r0: usize, out: &mut [f32]) {
    let n = out.len();
    let base = r0 * cols;
    match w {
        MatRef::F32(d) => out.copy_from_slice(&d[base..base + n]),
        MatRef::Bf16(d) => {
            for (o, &b) in out.iter_mut().zip(&d[base..base + n]) {
                *o = bf16_to_f32(b);
            }
        }
        MatRef::Int8 { q, scales } => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = q[base + i] as f32 * scales[(base + i) / cols];
            }
        }
    }
}

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
    if n < GEMM_MIN_ROWS {
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

/// Row dot products, weight rows split across threads; each weight block is read once for all
/// `n` activation rows.
fn gemv(isa: Isa, w: MatRef, x: &[f32], d_in: usize, d_out: usize, y: &mut [f32]) {
    let n = x.len() / d_in;
    let threads = crate::threads();
    // Below ~256 K weights (x_proj, dt_proj) waking a second thread costs more than it saves.
    let chunk = if threads == 1 || d_out * d_in < 1 << 18 {
        d_out
    } else {
        d_out.div_ceil(threads * 4).max(16)
    };
    let yp = SyncPtr::new(y);
    let job = |ci: usize| {
        let r0 = ci * chunk;
        let r1 = (r0 + chunk).min(d_out);
        for r in 0..n {
            let xr = &x[r * d_in..(r + 1) * d_in];
            // SAFETY: row `r`, columns `r0..r1` of `y` belong to this chunk only and are in
            // bounds (`y` is `[n, d_out]`, asserted by the caller); `y` itself is not used
            // while the jobs run.
            let yr = unsafe { yp.slice_mut(r * d_out + r0, r1 - r0) };
            dot_rows(isa, w, r0, xr, yr);
        }
    };
    let chunks = d_out.div_ceil(chunk);
    if chunks == 1 {
        job(0);
    } else {
        (0..chunks).into_par_iter().for_each(job);
    }
}

/// GEMM through `matrixmultiply`, output columns split across threads.
fn gemm(w: MatRef, x: &[f32], d_in: usize, d_out: usize, y: &mut [f32]) {
    let n = x.len() / d_in;
    let threads = crate::threads();
    // Two column blocks per thread: a thread slowed by other load leaves work to steal, while
    // each block's GEMM still amortises its packing of `x`.
    let per = d_out.div_ceil(2 * threads).max(GEMM_BLOCK_ROWS.min(d_out));
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
    let jobs = d_out.div_ceil(per);
    if jobs == 1 {
        job(0);
    } else {
        (0..jobs).into_par_iter().for_each(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_rng::lcg;

    /// Both product paths (few rows: dot products; many rows: GEMM), every storage format,
    /// against f64 sums over the dequantised weights, on one and on two threads.
    #[test]
    fn linear_matches_f64_on_both_paths() {
        let mut s = 11u64;
        for &(n, d_in, d_out) in &[(1, 33, 300), (3, 17, 5), (7, 64, 129), (40, 9, 513)] {
            let w: Vec<f32> = (0..d_out * d_in).map(|_| lcg(&mut s)).collect();
            let x: Vec<f32> = (0..n * d_in).map(|_| lcg(&mut s)).collect();
            let bias: Vec<f32> = (0..d_out).map(|_| lcg(&mut s)).collect();
            for dt in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::Int8] {
                let m = Mat::from_f32(d_out, d_in, w.clone(), dt);
                let wd = m.to_f32();
                for threads in [1, 2] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut y = vec![f32::NAN; n * d_out];
                    pool.install(|| linear(Isa::detect(), m.view(), &x, Some(&bias), d_in, &mut y));
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
}
