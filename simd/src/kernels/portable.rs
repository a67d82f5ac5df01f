//! Portable tiles: plain Rust that LLVM vectorises for the build target (SSE2, NEON). Each
//! weight row is read from memory once and reused from cache for the tile's rows of `x`.

use super::INT4_GROUP_BYTES;
use super::{bf16_to_f32, int4_groups, int4_row_bytes, Fmt, TileOut, INT4_GROUP};

/// `out[b][r] = Σ_j w[r, j] · x[b, j]` for `r < take`, `b < bt`; int8 without its row scale.
pub(super) fn tile(w: Fmt, x: &[f32], k: usize, take: usize, bt: usize, out: &mut TileOut) {
    for r in 0..take {
        for b in 0..bt {
            let xb = &x[b * k..(b + 1) * k];
            out[b][r] = match w {
                Fmt::F32(d) => dot8(&d[r * k..(r + 1) * k], xb, |v| v),
                Fmt::Bf16(d) => dot8(&d[r * k..(r + 1) * k], xb, bf16_to_f32),
                Fmt::I8(d) => dot8(&d[r * k..(r + 1) * k], xb, |v| v as f32),
                Fmt::I4 { q, scales } => {
                    let (rb, g) = (int4_row_bytes(k), int4_groups(k));
                    dot_int4(&q[r * rb..(r + 1) * rb], &scales[r * g..(r + 1) * g], xb)
                }
            };
        }
    }
}

/// Eight independent partial sums, combined pairwise at the end.
#[inline(always)]
fn dot8<T: Copy>(w: &[T], x: &[f32], f: impl Fn(T) -> f32) -> f32 {
    let k = x.len();
    let mut acc = [0f32; 8];
    let body = k / 8 * 8;
    for (wc, xc) in w[..body].chunks_exact(8).zip(x[..body].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += f(wc[l]) * xc[l];
        }
    }
    let mut tail = 0f32;
    for j in body..k {
        tail += f(w[j]) * x[j];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// One int4 row against `x`: per group, the codes' dot product times the group's scale.
fn dot_int4(row: &[u8], scales: &[f32], x: &[f32]) -> f32 {
    let mut total = 0f32;
    for (g, xg) in x.chunks(INT4_GROUP).enumerate() {
        let b = &row[g * INT4_GROUP_BYTES..(g + 1) * INT4_GROUP_BYTES];
        let mut acc = [0f32; 16];
        if xg.len() == INT4_GROUP {
            for i in 0..INT4_GROUP_BYTES {
                acc[i] += ((b[i] & 15) as i32 - 8) as f32 * xg[i];
                acc[i] += ((b[i] >> 4) as i32 - 8) as f32 * xg[i + INT4_GROUP_BYTES];
            }
        } else {
            for (i, &xv) in xg.iter().enumerate() {
                let nib = if i < INT4_GROUP_BYTES {
                    b[i] & 15
                } else {
                    b[i - INT4_GROUP_BYTES] >> 4
                };
                acc[i % 16] += (nib as i32 - 8) as f32 * xv;
            }
        }
        total += acc.iter().sum::<f32>() * scales[g];
    }
    total
}
