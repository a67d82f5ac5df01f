//! `y = x · Wᵀ + bias`, PyTorch's `nn.Linear` layout (`W` is `[out, in]`).

use crate::float::Float;

/// `x` is `[n, d_in]`, `w` is `[d_out, d_in]`, `bias` is `[d_out]`; returns `[n, d_out]`.
/// Each output is `(Σ_j w[o, j] · x[r, j]) + bias[o]`, summed in increasing `j`.
pub fn linear_fwd<T: Float>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    n: usize,
    d_in: usize,
    d_out: usize,
) -> Vec<T> {
    debug_assert_eq!(x.len(), n * d_in);
    debug_assert_eq!(w.len(), d_out * d_in);
    let mut y = vec![T::ZERO; n * d_out];
    for r in 0..n {
        let xr = &x[r * d_in..(r + 1) * d_in];
        for o in 0..d_out {
            let wo = &w[o * d_in..(o + 1) * d_in];
            let mut acc = T::ZERO;
            for j in 0..d_in {
                acc += wo[j] * xr[j];
            }
            if let Some(b) = bias {
                acc += b[o];
            }
            y[r * d_out + o] = acc;
        }
    }
    y
}

/// Backward of [`linear_fwd`]. Accumulates `grad_w[o, j] += Σ_r dy[r, o] · x[r, j]` and
/// `grad_bias[o] += Σ_r dy[r, o]` (rows in increasing `r`), and returns
/// `dx[r, j] = Σ_o w[o, j] · dy[r, o]` (increasing `o`).
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd<T: Float>(
    x: &[T],
    w: &[T],
    dy: &[T],
    n: usize,
    d_in: usize,
    d_out: usize,
    grad_w: &mut [T],
    grad_bias: Option<&mut [T]>,
) -> Vec<T> {
    debug_assert_eq!(dy.len(), n * d_out);
    for r in 0..n {
        let xr = &x[r * d_in..(r + 1) * d_in];
        for o in 0..d_out {
            let g = dy[r * d_out + o];
            let gw = &mut grad_w[o * d_in..(o + 1) * d_in];
            for j in 0..d_in {
                gw[j] += g * xr[j];
            }
        }
    }
    if let Some(gb) = grad_bias {
        for r in 0..n {
            for o in 0..d_out {
                gb[o] += dy[r * d_out + o];
            }
        }
    }
    let mut dx = vec![T::ZERO; n * d_in];
    for r in 0..n {
        let dxr = &mut dx[r * d_in..(r + 1) * d_in];
        for o in 0..d_out {
            let g = dy[r * d_out + o];
            let wo = &w[o * d_in..(o + 1) * d_in];
            for j in 0..d_in {
                dxr[j] += wo[j] * g;
            }
        }
    }
    dx
}
