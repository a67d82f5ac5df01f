//! Whole-model element-wise work on the driver's thread pool: copies between the engine's
//! named tensors and the flat buffers (and their bytes), and products by one scalar. Each
//! element is computed as before, on its own, so splitting the work over threads changes no
//! bit. The gradient norm's Σ g² ([`sum_of_squares`]) has one fixed order of its own, in
//! blocks that do not depend on the number of threads.

use rayon::prelude::*;
use rayon::ThreadPool;
use reference::engine::NamedTensors;
use reference::Tensor;

use crate::dist::shard::FlatLayout;
use crate::dist::DistError;

/// Elements a thread copies or scales at a time.
const PIECE: usize = 1 << 16;

/// Elements of one block of [`sum_of_squares`]: fixed, so the order of the sum is the same on
/// any number of threads.
pub const SUMSQ_BLOCK: usize = 1 << 16;

/// Σ x² in f64, in one fixed order whatever the threads: each block of [`SUMSQ_BLOCK`]
/// elements is summed in four lanes (lane `j` takes the elements `≡ j mod 4` in order, then
/// `(l0 + l1) + (l2 + l3)`), and the blocks' sums are added in block order. The blocks run on
/// the current rayon pool. A serial sum over a billion elements is a chain of dependent adds
/// (about 1.8 s at 1.37 B parameters); this is 4 × threads times shorter.
pub fn sum_of_squares(x: &[f32]) -> f64 {
    fn block(b: &[f32]) -> f64 {
        let mut l = [0f64; 4];
        let mut q = b.chunks_exact(4);
        for c in &mut q {
            for (l, &v) in l.iter_mut().zip(c) {
                *l += f64::from(v) * f64::from(v);
            }
        }
        for (l, &v) in l.iter_mut().zip(q.remainder()) {
            *l += f64::from(v) * f64::from(v);
        }
        (l[0] + l[1]) + (l[2] + l[3])
    }
    let parts: Vec<f64> = x.par_chunks(SUMSQ_BLOCK).map(block).collect();
    parts.iter().sum()
}

/// `dst = src` (equal lengths).
pub(super) fn copy(pool: &ThreadPool, dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "copy between unequal slices");
    if dst.len() <= PIECE {
        dst.copy_from_slice(src);
        return;
    }
    pool.install(|| {
        dst.par_chunks_mut(PIECE)
            .zip(src.par_chunks(PIECE))
            .for_each(|(d, s)| d.copy_from_slice(s))
    });
}

/// `x *= c` for every element.
pub(super) fn scale(pool: &ThreadPool, x: &mut [f32], c: f32) {
    pool.install(|| {
        x.par_chunks_mut(PIECE)
            .for_each(|p| p.iter_mut().for_each(|g| *g *= c))
    });
}

/// `bytes` (4 a value) = `x` as little-endian bytes.
pub(super) fn to_le_bytes(pool: &ThreadPool, x: &[f32], bytes: &mut [u8]) {
    assert_eq!(bytes.len(), 4 * x.len(), "to_le_bytes: 4 bytes a value");
    pool.install(|| {
        bytes
            .par_chunks_mut(4 * PIECE)
            .zip(x.par_chunks(PIECE))
            .for_each(|(b, x)| {
                for (b, x) in b.chunks_exact_mut(4).zip(x) {
                    b.copy_from_slice(&x.to_le_bytes());
                }
            })
    });
}

/// `x` = the little-endian values of `bytes` (4 a value).
pub(super) fn from_le_bytes(pool: &ThreadPool, bytes: &[u8], x: &mut [f32]) {
    assert_eq!(bytes.len(), 4 * x.len(), "from_le_bytes: 4 bytes a value");
    pool.install(|| {
        x.par_chunks_mut(PIECE)
            .zip(bytes.par_chunks(4 * PIECE))
            .for_each(|(x, b)| {
                for (x, b) in x.iter_mut().zip(b.chunks_exact(4)) {
                    *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            })
    });
}

/// Copies each pair, split into pieces, over the pool.
fn copy_pairs(pool: &ThreadPool, pairs: Vec<(&mut [f32], &[f32])>) {
    let pieces: Vec<(&mut [f32], &[f32])> = pairs
        .into_iter()
        .flat_map(|(d, s)| d.chunks_mut(PIECE).zip(s.chunks(PIECE)))
        .collect();
    pool.install(|| {
        pieces
            .into_par_iter()
            .for_each(|(d, s)| d.copy_from_slice(s))
    });
}

/// [`FlatLayout::flatten_into`] over the pool: `named` (checked against the layout) into
/// `flat` (`padded()` elements), the padding zeroed.
pub(super) fn flatten_into(
    pool: &ThreadPool,
    layout: &FlatLayout,
    named: &[(String, Tensor<f32>)],
    flat: &mut [f32],
) -> Result<(), DistError> {
    layout.check(named)?;
    if flat.len() != layout.padded() {
        return Err(DistError::Layout(format!(
            "a flat buffer of {} elements for a layout of {}",
            flat.len(),
            layout.padded()
        )));
    }
    let (mut rest, pad) = flat.split_at_mut(layout.numel);
    pad.iter_mut().for_each(|x| *x = 0.0);
    let mut pairs = Vec::with_capacity(named.len());
    for (s, (_, t)) in layout.slots.iter().zip(named) {
        let (d, r) = std::mem::take(&mut rest).split_at_mut(s.flat.len());
        pairs.push((d, &t.data[..]));
        rest = r;
    }
    copy_pairs(pool, pairs);
    Ok(())
}

/// [`FlatLayout::unflatten`] over the pool into `named`, reusing its tensors when they have
/// the layout's names and shapes (else they are made anew). `flat` holds at least `numel`
/// elements.
pub(super) fn unflatten_into(
    pool: &ThreadPool,
    layout: &FlatLayout,
    flat: &[f32],
    named: &mut NamedTensors,
) {
    if layout.check(named).is_err() {
        *named = layout
            .slots
            .iter()
            .map(|s| {
                let t = Tensor::from_vec(&s.shape, vec![0.0; s.flat.len()]);
                (s.name.clone(), t)
            })
            .collect();
    }
    let pairs = layout
        .slots
        .iter()
        .zip(named.iter_mut())
        .map(|(s, (_, t))| (&mut t.data[..], &flat[s.flat.clone()]))
        .collect();
    copy_pairs(pool, pairs);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// Tensors longer than a piece and odd sizes, over three threads.
    fn layout() -> FlatLayout {
        FlatLayout::from_shapes(
            vec![
                ("a.weight".into(), vec![3, PIECE + 5]),
                ("b.bias".into(), vec![7]),
                ("c.weight".into(), vec![2 * PIECE + 1]),
            ],
            4,
        )
    }

    #[test]
    fn flatten_and_unflatten_match_the_serial_layout() {
        let (l, p) = (layout(), pool(3));
        let named: NamedTensors = l
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let v = (0..s.flat.len())
                    .map(|j| (i * 7 + j) as f32 * 0.5)
                    .collect();
                (s.name.clone(), Tensor::from_vec(&s.shape, v))
            })
            .collect();
        let mut flat = vec![f32::NAN; l.padded()];
        flatten_into(&p, &l, &named, &mut flat).unwrap();
        assert_eq!(flat, l.flatten(&named).unwrap());
        let mut back = NamedTensors::new();
        unflatten_into(&p, &l, &flat, &mut back);
        assert_eq!(back, named);
        // Reused buffers are overwritten.
        flat.iter_mut().for_each(|x| *x += 1.0);
        unflatten_into(&p, &l, &flat, &mut back);
        assert_eq!(back, l.unflatten(&flat));
        let mut wrong = named.clone();
        wrong.swap(0, 1);
        assert!(flatten_into(&p, &l, &wrong, &mut flat).is_err());
        assert!(flatten_into(&p, &l, &named, &mut flat[1..]).is_err());
    }

    #[test]
    fn copy_and_scale_are_the_serial_loops() {
        let p = pool(3);
        let src: Vec<f32> = (0..3 * PIECE + 11).map(|i| i as f32 * 0.37 - 9.0).collect();
        let mut dst = vec![0.0f32; src.len()];
        copy(&p, &mut dst, &src);
        assert_eq!(dst, src);
        scale(&p, &mut dst, 0.3);
        let want: Vec<f32> = src.iter().map(|&x| x * 0.3).collect();
        assert_eq!(dst, want);
        let mut bytes = vec![0u8; 4 * src.len()];
        to_le_bytes(&p, &src, &mut bytes);
        let want: Vec<u8> = src.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(bytes, want);
        from_le_bytes(&p, &bytes, &mut dst);
        assert_eq!(dst, src);
    }

    #[test]
    fn the_sum_of_squares_has_one_order_on_any_number_of_threads() {
        let mut r = reference::rng::Rng::new(31);
        // Values over many magnitudes, so that a different order would round differently.
        let x: Vec<f32> = (0..5 * SUMSQ_BLOCK + 13)
            .map(|_| r.uniform(-0.5, 0.5) as f32 * 10f32.powi(r.below(7) as i32 - 3))
            .collect();
        let one = pool(1).install(|| sum_of_squares(&x));
        for t in [2, 3, 5] {
            let got = pool(t).install(|| sum_of_squares(&x));
            assert_eq!(got.to_bits(), one.to_bits(), "{t} threads");
        }
        // The order written down: four lanes a block, blocks in order.
        let mut want = 0f64;
        for b in x.chunks(SUMSQ_BLOCK) {
            let mut l = [0f64; 4];
            for (i, &v) in b.iter().enumerate() {
                l[i % 4] += f64::from(v) * f64::from(v);
            }
            want += (l[0] + l[1]) + (l[2] + l[3]);
        }
        assert_eq!(one.to_bits(), want.to_bits());
        let serial: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        assert!(
            (one - serial).abs() <= 1e-12 * serial,
            "{one} against {serial}"
        );
        assert_eq!(sum_of_squares(&[]), 0.0);
    }
}
