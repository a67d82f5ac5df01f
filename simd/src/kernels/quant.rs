//! The reduced-precision weight formats: bf16 conversion, int8 rows (one scale per row) and
//! int4 groups (one scale per group of 32 along a row).
//!
//! int4 layout, per row: `groups = cols.div_ceil(32)` groups of 16 bytes (a row is padded
//! with zeros to whole groups). Byte `i` of a group holds element `i` in its low nibble and
//! element `16 + i` in its high nibble, each stored as `q + 8` for `q` in `-8..=7`, as
//! llama.cpp's Q4_0 does; `w = q · scale`. The scale of a group is `m / -8`, where `m` is its
//! value of largest magnitude (sign kept), so that value is represented exactly.

/// Elements per int4 group.
pub const INT4_GROUP: usize = 32;
/// Bytes per int4 group.
pub const INT4_GROUP_BYTES: usize = INT4_GROUP / 2;

/// bf16 bits → f32 (exact).
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 → bf16 bits, rounding to nearest even (NaN stays NaN).
#[inline]
pub fn f32_to_bf16(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// Quantises one row to int8 with a symmetric scale `max|w| / 127`; returns the scale
/// (1 for an all-zero row). `q[j] = round(w[j] / scale)`, ties away from zero.
pub fn quantize_row(w: &[f32], q: &mut [i8]) -> f32 {
    let amax = w.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let scale = if amax > 0.0 && amax.is_finite() {
        amax / 127.0
    } else {
        1.0
    };
    let inv = 1.0 / scale;
    for (o, &v) in q.iter_mut().zip(w) {
        *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// Groups of an int4 row of `cols` values.
#[inline]
pub fn int4_groups(cols: usize) -> usize {
    cols.div_ceil(INT4_GROUP)
}

/// Bytes of one int4 row of `cols` values.
#[inline]
pub fn int4_row_bytes(cols: usize) -> usize {
    int4_groups(cols) * INT4_GROUP_BYTES
}

/// Quantises one row (`w.len()` values) into `q` (`int4_row_bytes(w.len())` bytes) and
/// `scales` (`int4_groups(w.len())`).
pub fn quantize_row_int4(w: &[f32], q: &mut [u8], scales: &mut [f32]) {
    debug_assert_eq!(q.len(), int4_row_bytes(w.len()));
    debug_assert_eq!(scales.len(), int4_groups(w.len()));
    for (g, (qg, s)) in q
        .chunks_exact_mut(INT4_GROUP_BYTES)
        .zip(scales.iter_mut())
        .enumerate()
    {
        let vals = &w[g * INT4_GROUP..((g + 1) * INT4_GROUP).min(w.len())];
        let m = vals
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let scale = if m != 0.0 && m.is_finite() {
            m / -8.0
        } else {
            1.0
        };
        let inv = 1.0 / scale;
        let code = |i: usize| -> u8 {
            let v = vals.get(i).copied().unwrap_or(0.0);
            ((v * inv).round().clamp(-8.0, 7.0) as i32 + 8) as u8
        };
        for (i, b) in qg.iter_mut().enumerate() {
            *b = code(i) | (code(i + INT4_GROUP_BYTES) << 4);
        }
        *s = scale;
    }
}

/// The integer value (`-8..=7`) of element `j` of an int4 row.
#[inline(always)]
pub fn int4_code(row: &[u8], j: usize) -> i32 {
    let b = row[j / INT4_GROUP * INT4_GROUP_BYTES + j % INT4_GROUP_BYTES];
    let nib = if j % INT4_GROUP < INT4_GROUP_BYTES {
        b & 15
    } else {
        b >> 4
    };
    nib as i32 - 8
}

/// Element `j` of an int4 row as f32 (`code · scale`).
#[inline(always)]
pub fn int4_value(row: &[u8], scales: &[f32], j: usize) -> f32 {
    int4_code(row, j) as f32 * scales[j / INT4_GROUP]
}

/// Writes the first `out.len()` values of an int4 row as f32.
pub fn dequant_row_int4(row: &[u8], scales: &[f32], out: &mut [f32]) {
    for (g, o) in out.chunks_mut(INT4_GROUP).enumerate() {
        let s = scales[g];
        let b = &row[g * INT4_GROUP_BYTES..(g + 1) * INT4_GROUP_BYTES];
        for (i, v) in o.iter_mut().enumerate() {
            let nib = if i < INT4_GROUP_BYTES {
                b[i] & 15
            } else {
                b[i - INT4_GROUP_BYTES] >> 4
            };
            *v = (nib as i32 - 8) as f32 * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::lcg;

    #[test]
    fn int8_quantisation_is_within_half_a_step() {
        let mut s = 3u64;
        let w: Vec<f32> = (0..301).map(|_| lcg(&mut s) * 3.0).collect();
        let mut q = vec![0i8; w.len()];
        let scale = quantize_row(&w, &mut q);
        let amax = w.iter().fold(0f32, |a, &v| a.max(v.abs()));
        assert_eq!(scale, amax / 127.0);
        for (&v, &qi) in w.iter().zip(&q) {
            assert!((v - qi as f32 * scale).abs() <= 0.5 * scale * 1.0001);
        }
        assert!(q.iter().any(|&v| v.abs() == 127));
    }

    /// Every value within half a step of its group's scale, the largest exactly, the padding
    /// zero, and the accessor and the row dequantiser agree.
    #[test]
    fn int4_quantisation_is_within_half_a_step_per_group() {
        let mut s = 5u64;
        for cols in [1usize, 31, 32, 33, 100, 256] {
            let w: Vec<f32> = (0..cols).map(|_| lcg(&mut s) * 2.0).collect();
            let mut q = vec![0u8; int4_row_bytes(cols)];
            let mut sc = vec![0f32; int4_groups(cols)];
            quantize_row_int4(&w, &mut q, &mut sc);
            let mut d = vec![0f32; cols];
            dequant_row_int4(&q, &sc, &mut d);
            for (g, vals) in w.chunks(INT4_GROUP).enumerate() {
                let step = sc[g].abs();
                let m = vals.iter().fold(0f32, |a, &v| a.max(v.abs()));
                assert!((step - m / 8.0).abs() <= 1e-6 * m, "cols {cols} group {g}");
                for (i, &v) in vals.iter().enumerate() {
                    let j = g * INT4_GROUP + i;
                    assert_eq!(d[j], int4_value(&q, &sc, j));
                    // Values of the other sign than the largest can reach +8 steps, clamped
                    // to 7: up to one step off; every other value half a step at most.
                    let bound = if int4_code(&q, j) == 7 { 1.0 } else { 0.5 };
                    assert!(
                        (v - d[j]).abs() <= bound * step * 1.0001,
                        "cols {cols} [{j}]"
                    );
                    if v.abs() == m {
                        assert_eq!(d[j], v, "the largest value is exact");
                    }
                }
            }
            for j in cols..int4_groups(cols) * INT4_GROUP {
                assert_eq!(int4_code(&q, j), 0, "padding [{j}] of {cols}");
            }
        }
    }

    #[test]
    fn bf16_round_trip_rounds_to_nearest() {
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0)), 1.0);
        let v = 1.0 + 1.0 / 256.0 + 1.0 / 1024.0; // just above the halfway point
        assert_eq!(bf16_to_f32(f32_to_bf16(v)), 1.0 + 1.0 / 128.0);
    }
}
