//! Weight matrices in f32, bf16, int8 or int4, owned or memory-mapped, and their rows as f32. The
//! matrix products on them are in [`crate::ops::linear`].

use std::sync::Arc;

use memmap2::Mmap;

use rayon::prelude::*;

use crate::kernels::{
    bf16_to_f32, dequant_row_int4, f32_to_bf16, int4_groups, int4_row_bytes, quantize_row,
    quantize_row_int4, MatRef,
};
use crate::WeightDtype;

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
    Int8 {
        q: Buf<i8>,
        scales: Vec<f32>,
    },
    /// Packed int4 rows and one scale per group of 32 (layout: `crate::kernels`).
    Int4 {
        q: Buf<u8>,
        scales: Buf<f32>,
    },
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
                let mut scales = vec![0f32; rows];
                // Every thread quantises its own rows (a 1.4 B model in seconds).
                q.par_chunks_mut(cols.max(1))
                    .zip(scales.par_iter_mut())
                    .enumerate()
                    .for_each(|(r, (qr, s))| {
                        *s = quantize_row(&w[r * cols..(r + 1) * cols], qr);
                    });
                MatData::Int8 {
                    q: Buf::Owned(q),
                    scales,
                }
            }
            WeightDtype::Int4 => {
                let (rb, g) = (int4_row_bytes(cols), int4_groups(cols));
                let mut q = vec![0u8; rows * rb];
                let mut scales = vec![0f32; rows * g];
                q.par_chunks_mut(rb.max(1))
                    .zip(scales.par_chunks_mut(g.max(1)))
                    .enumerate()
                    .for_each(|(r, (qr, sr))| {
                        quantize_row_int4(&w[r * cols..(r + 1) * cols], qr, sr);
                    });
                MatData::Int4 {
                    q: Buf::Owned(q),
                    scales: Buf::Owned(scales),
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
            MatData::Int4 { q, scales } => MatRef::Int4 {
                q: q.as_slice(),
                scales: scales.as_slice(),
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
            MatData::Int4 { .. } => {
                self.rows * (int4_row_bytes(self.cols) + 4 * int4_groups(self.cols))
            }
        }
    }

    pub fn is_mapped(&self) -> bool {
        match &self.data {
            MatData::F32(b) => b.is_mapped(),
            MatData::Bf16(b) => b.is_mapped(),
            MatData::Int8 { q, .. } => q.is_mapped(),
            MatData::Int4 { q, .. } => q.is_mapped(),
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
        MatRef::Int4 { q, scales } => {
            let (rb, g) = (int4_row_bytes(cols), int4_groups(cols));
            MatRef::Int4 {
                q: &q[r0 * rb..r1 * rb],
                scales: &scales[r0 * g..r1 * g],
            }
        }
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
            for (r, (o, qr)) in out
                .chunks_mut(cols)
                .zip(q[base..base + n].chunks(cols))
                .enumerate()
            {
                let s = scales[r0 + r];
                for (v, &qv) in o.iter_mut().zip(qr) {
                    *v = qv as f32 * s;
                }
            }
        }
        MatRef::Int4 { q, scales } => {
            let (rb, g) = (int4_row_bytes(cols), int4_groups(cols));
            for (r, o) in out.chunks_mut(cols).enumerate() {
                let row = r0 + r;
                dequant_row_int4(
                    &q[row * rb..(row + 1) * rb],
                    &scales[row * g..(row + 1) * g],
                    o,
                );
            }
        }
    }
}
