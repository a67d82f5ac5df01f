//! The decode step's device kernels (`gpu/kernels/decode.cu`) against host references, at
//! odd sizes, with sentinels around every output:
//! - `gemv_lp` (the projections: one weight read for all rows) against an f64 sum over the
//!   same low-precision operands, its 16-byte and scalar paths, and the same bits for a row
//!   whatever the number of rows;
//! - `sample_rows_f32` (sampling on the device) against the host sampler: greedy and top-k 1
//!   with a repetition penalty choose the same ids, draws stay inside the top-k / top-p set
//!   and follow its probabilities, the same (seed, draw) gives the same id, padding ids are
//!   never drawn, NaN logits are reported.
//!
//! Without a CUDA device every test prints a `skipping` line and passes.

use std::sync::Arc;

use conformance::gpu_ops::{normal, Report};
use conformance::{seed_of, tol};
use gpu::cuda::{Buf, Dev};
use gpu::kernels::{scan_chunk_for, KernelShape};
use gpu::ops::decode::{
    gemv, gemv_named, sample_rows, GemvLp, SampleHow, SampleRowsF32, GEMV_ROWS, SAMPLE_NOT_FINITE,
};
use gpu::ops::{PAD, SENTINEL};
use gpu::params::{Ptr, PtrMut};
use reference::rng::Rng;
use trainer::generate::{penalize, Sampler, Sampling};

fn dev(test: &str) -> Option<Arc<Dev>> {
    if let Err(e) = gpu::available() {
        println!("skipping {test}: {e}");
        return None;
    }
    let shape = KernelShape {
        d_state_pad: 16,
        d_conv: 4,
        chunk: scan_chunk_for(16).unwrap(),
    };
    Some(Arc::new(
        Dev::open(0, shape, &gpu::ops::all_kernels()).unwrap(),
    ))
}

/// f32 -> bf16 bits, round to nearest even (as `cvt.rn.bf16.f32`).
fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn from_bf16(b: u16) -> f64 {
    f32::from_bits((b as u32) << 16) as f64
}

/// A buffer of `n` values of type `T` between `PAD` sentinels on each side, filled with `v`.
fn guarded_f32(dev: &Arc<Dev>, n: usize) -> Buf {
    let v = vec![f32::from_bits(SENTINEL); n + 2 * PAD];
    dev.upload(&v).unwrap()
}

/// The f32 values of `buf` between its sentinels; panics naming `what` when a sentinel moved.
fn unguard(buf: &Buf, n: usize, what: &str) -> Vec<f32> {
    let mut v = vec![0f32; n + 2 * PAD];
    buf.read(0, &mut v).unwrap();
    for (i, x) in v[..PAD].iter().chain(&v[PAD + n..]).enumerate() {
        assert_eq!(x.to_bits(), SENTINEL, "{what}: sentinel {i} overwritten");
    }
    v[PAD..PAD + n].to_vec()
}

/// (name, n_out, k, rows, x in f32, weight misaligned by this many elements)
const GEMV_CASES: [(&str, usize, usize, usize, bool, usize); 8] = [
    ("in_proj_130m_b1", 3072, 768, 1, false, 0),
    ("out_proj_1_4b_b8", 2048, 4096, 8, false, 0),
    ("x_proj_f32_input_b5", 80, 1536, 5, true, 0),
    ("dt_proj_k4_scalar", 128, 4, 8, true, 0),
    ("odd_k_scalar_b3", 37, 29, 3, false, 0),
    ("lm_head_odd_vocab_b7", 1001, 64, 7, false, 0),
    ("misaligned_weight_b2", 9, 4096, 2, false, 3),
    // 16-byte loads of bf16 (8 values), not of int8 codes (16): int8 takes the scalar path.
    ("k_8_not_16_b4", 24, 136, 4, false, 0),
];

#[test]
fn gpu_gemv_matches_an_f64_sum_over_the_same_operands() {
    let Some(dev) = dev("gpu_gemv_matches_an_f64_sum_over_the_same_operands") else {
        return;
    };
    let mut report = Report(Vec::new());
    for q8 in [false, true] {
        gemv_cases(&dev, q8, &mut report);
    }
    report.finish("gemv_lp");
    // More rows than one launch takes is an error, not a silent truncation.
    let y = dev.alloc(4 * 9 * 8).unwrap();
    let w = dev.alloc(2 * 8 * 8).unwrap();
    let p = GemvLp {
        w: Ptr::new(w.ptr),
        ldw: 8,
        wq: Ptr::NULL,
        ws: Ptr::NULL,
        x_lp: Ptr::new(w.ptr),
        x_f32: Ptr::NULL,
        ldx: 8,
        y: PtrMut::new(y.ptr),
        ldy: 8,
        n_out: 8,
        k: 8,
        rows: GEMV_ROWS as i64 + 1,
        split: 1,
        vec: 0,
        lp_mode: 0,
    };
    // SAFETY: refused before any launch.
    assert!(unsafe { gemv(&dev, &p) }.is_err());
}

/// The weights of a GEMV case: bf16 values, or int8 codes with one scale a row (`q8`); the
/// device buffer of the codes or values (with `skew` leading elements), the scales' buffer,
/// and each weight's value, scale included, as f64.
fn gemv_weights(
    dev: &Arc<Dev>,
    rng: &mut Rng,
    (n_out, k, skew): (usize, usize, usize),
    q8: bool,
) -> (Buf, Option<Buf>, Vec<f64>) {
    if !q8 {
        let w: Vec<u16> = normal(rng, n_out * k + skew, 0.0, 0.05)
            .into_iter()
            .map(bf16)
            .collect();
        let vals = w[skew..].iter().map(|&b| from_bf16(b)).collect();
        return (dev.upload(&w).unwrap(), None, vals);
    }
    // Codes over the whole range (±127, and some at the ends), scales of either sign's size.
    let q: Vec<i8> = (0..n_out * k + skew)
        .map(|_| rng.uniform(-127.49, 127.49).round() as i8)
        .collect();
    let s: Vec<f32> = (0..n_out).map(|_| rng.uniform(1e-4, 2e-3) as f32).collect();
    let vals = (0..n_out * k)
        .map(|i| q[skew + i] as f64 * s[i / k] as f64)
        .collect();
    (dev.upload(&q).unwrap(), Some(dev.upload(&s).unwrap()), vals)
}

/// `gemv_lp` (or its int8 twin, `q8`) on every case of [`GEMV_CASES`] against an f64 sum over
/// the same operands, at the case's rows and at one row (the same bits for row 0), and every
/// 128-thread variant giving its bits.
fn gemv_cases(dev: &Arc<Dev>, q8: bool, report: &mut Report) {
    let fmt = if q8 { "int8" } else { "bf16" };
    for (name, n_out, k, rows, x_f32, skew) in GEMV_CASES {
        let mut rng = Rng::new(seed_of(name) ^ q8 as u64);
        let (wb, sb, wv) = gemv_weights(dev, &mut rng, (n_out, k, skew), q8);
        let x = normal(&mut rng, rows * k, 0.0, 1.0);
        let x_lp: Vec<u16> = x.iter().map(|&v| bf16(v)).collect();
        let ldy = n_out + 3;
        let xb = if x_f32 {
            dev.upload(&x).unwrap()
        } else {
            dev.upload(&x_lp).unwrap()
        };
        let mut want = vec![0f64; rows * n_out];
        for r in 0..rows {
            for n in 0..n_out {
                want[r * n_out + n] = (0..k)
                    .map(|j| wv[n * k + j] * from_bf16(x_lp[r * k + j]))
                    .sum();
            }
        }
        let name = &format!("{name} {fmt}");
        let mut by_rows = Vec::new();
        for run_rows in [rows, 1] {
            let y = guarded_f32(dev, rows * ldy);
            let (w, wq) = if q8 {
                (0, wb.at::<i8>(skew))
            } else {
                (wb.at::<u16>(skew), 0)
            };
            let p = GemvLp {
                w: Ptr::new(w),
                ldw: k as i64,
                wq: Ptr::new(wq),
                ws: Ptr::new(sb.as_ref().map_or(0, |b| b.ptr)),
                x_lp: Ptr::new(if x_f32 { 0 } else { xb.ptr }),
                x_f32: Ptr::new(if x_f32 { xb.ptr } else { 0 }),
                ldx: k as i64,
                y: PtrMut::new(y.at::<f32>(PAD)),
                ldy: ldy as i64,
                n_out: n_out as i64,
                k: k as i64,
                rows: run_rows as i64,
                split: 1,
                vec: 0,
                lp_mode: 0,
            }
            .tuned();
            let per_load = if q8 { 16 } else { 8 };
            assert_eq!(
                p.vec == 1,
                k % per_load == 0 && skew == 0,
                "{name}: vec path"
            );
            // SAFETY: w (or wq, with a scale per row) holds n_out rows of k (after the skew),
            // x `rows` rows of k, y `rows` rows of ldy >= n_out between sentinels.
            unsafe { gemv(dev, &p) }.unwrap();
            let got = unguard(&y, rows * ldy, name);
            for r in run_rows..rows {
                assert!(
                    got[r * ldy..(r + 1) * ldy]
                        .iter()
                        .all(|v| v.to_bits() == SENTINEL),
                    "{name}: row {r} written by a {run_rows}-row launch"
                );
            }
            for r in 0..run_rows {
                assert!(
                    got[r * ldy + n_out..(r + 1) * ldy]
                        .iter()
                        .all(|v| v.to_bits() == SENTINEL),
                    "{name}: the gap after row {r} was written"
                );
            }
            let dense: Vec<f32> = (0..run_rows)
                .flat_map(|r| got[r * ldy..r * ldy + n_out].to_vec())
                .collect();
            report.cmp(
                format!("{name} ({run_rows} rows, vec {})", p.vec),
                &dense,
                &want[..run_rows * n_out],
                tol::gpu::OP_GEMV_LP,
            );
            by_rows.push(dense[..n_out].to_vec());
            if p.vec == 1 {
                same_bits_in_every_variant(dev, name, p, rows * ldy);
            }
        }
        assert_eq!(
            by_rows[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            by_rows[1].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{name}: row 0 differs between {rows} rows and 1"
        );
    }
}

/// `gemv_lp_nl4` and `gemv_lp_nl8` (weight loads in flight, 128 threads) give `gemv_lp`'s
/// bits at every split they take, and keep inside `y`'s rows (sentinels), for the 16-byte
/// case `p` whose output holds `n` guarded values.
fn same_bits_in_every_variant(dev: &Arc<Dev>, name: &str, p: GemvLp, n: usize) {
    for split in [1, 2, 4] {
        let mut outs = Vec::new();
        for kernel in ["gemv_lp", "gemv_lp_nl4", "gemv_lp_nl8"] {
            let fresh = guarded_f32(dev, n);
            let q = GemvLp {
                y: PtrMut::new(fresh.at::<f32>(PAD)),
                split,
                ..p
            };
            // SAFETY: as the launch in the caller, into a buffer of the same shape.
            unsafe { gemv_named(dev, &q, kernel) }.unwrap();
            let got = unguard(&fresh, n, &format!("{name} {kernel} split {split}"));
            outs.push((kernel, got.iter().map(|v| v.to_bits()).collect::<Vec<_>>()));
        }
        for (kernel, bits) in &outs[1..] {
            assert_eq!(
                bits, &outs[0].1,
                "{name}: {kernel} differs from gemv_lp at split {split}"
            );
        }
    }
}

/// Runs `sample_rows_f32` on `logits` (`[rows, vocab]`) with each row's prompt marked in its
/// penalty context and `fed[b]` as the token fed this step; returns the ids.
fn draw(
    dev: &Arc<Dev>,
    logits: &[f32],
    vocab: usize,
    prompts: &[Vec<u32>],
    fed: &[u32],
    how: &[SampleHow],
) -> Vec<u32> {
    let rows = fed.len();
    let mut seen = vec![0u8; rows * vocab];
    for (b, p) in prompts.iter().enumerate() {
        for &t in p {
            seen[b * vocab + t as usize] = 1;
        }
    }
    let lb = dev.upload(logits).unwrap();
    let sb = dev.upload(&seen).unwrap();
    let tb = dev.upload(fed).unwrap();
    let hb = dev.upload(&SampleHow::bytes(how)).unwrap();
    let mut ids = vec![SENTINEL; rows + 2 * PAD];
    let ib = dev.upload(&ids).unwrap();
    let p = SampleRowsF32 {
        logits: Ptr::new(lb.ptr),
        vocab: vocab as i64,
        tokens: Ptr::new(tb.ptr),
        how: Ptr::new(hb.ptr),
        seen: PtrMut::new(sb.ptr),
        ids: PtrMut::new(ib.at::<u32>(PAD)),
    };
    // SAFETY: every buffer holds `rows` rows of its width; sampleable <= vocab.
    unsafe { sample_rows(dev, rows, &p) }.unwrap();
    ib.read(0, &mut ids).unwrap();
    assert!(ids[..PAD]
        .iter()
        .chain(&ids[PAD + rows..])
        .all(|&v| v == SENTINEL));
    ids[PAD..PAD + rows].to_vec()
}

fn how(s: &Sampling, sampleable: usize, draw: u64) -> SampleHow {
    SampleHow {
        temperature: s.temperature as f32,
        top_p: s.top_p as f32,
        penalty: s.repetition_penalty,
        top_k: s.top_k as u32,
        sampleable: sampleable as u32,
        pad: 0,
        seed: s.seed,
        draw,
    }
}

#[test]
fn gpu_sampling_chooses_like_the_host_sampler() {
    let Some(dev) = dev("gpu_sampling_chooses_like_the_host_sampler") else {
        return;
    };
    let (rows, vocab, sampleable) = (5usize, 1003usize, 997usize);
    let mut rng = Rng::new(seed_of("gpu_sampling"));
    let logits = normal(&mut rng, rows * vocab, 0.0, 3.0);
    let prompts: Vec<Vec<u32>> = (0..rows)
        .map(|b| {
            (0..3 + 4 * b)
                .map(|_| rng.below(vocab as u64) as u32)
                .collect()
        })
        .collect();
    let fed: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u64) as u32).collect();
    // Greedy and top-k 1 with a penalty: the host sampler's ids.
    for s in [
        Sampling {
            temperature: 0.0,
            repetition_penalty: 1.3,
            ..Sampling::default()
        },
        Sampling {
            temperature: 0.8,
            top_k: 1,
            repetition_penalty: 2.0,
            ..Sampling::default()
        },
    ] {
        let hows: Vec<SampleHow> = (0..rows).map(|_| how(&s, sampleable, 0)).collect();
        let got = draw(&dev, &logits, vocab, &prompts, &fed, &hows);
        for b in 0..rows {
            let mut sm = Sampler::new(&s, vocab).unwrap();
            sm.limit_to(sampleable);
            sm.observe(&prompts[b]);
            sm.observe(&[fed[b]]);
            let want = sm
                .sample(&mut logits[b * vocab..(b + 1) * vocab].to_vec())
                .unwrap();
            assert_eq!(got[b], want, "row {b}, {s:?}");
        }
    }
    // Draws: inside the host's top-k / top-p set, following its probabilities, repeatable.
    let s = Sampling {
        temperature: 0.7,
        top_k: 6,
        top_p: 0.8,
        repetition_penalty: 1.5,
        seed: 9,
        ..Sampling::default()
    };
    let n = 600;
    let mut counts = vec![vec![0usize; vocab]; rows];
    for d in 0..n {
        let hows: Vec<SampleHow> = (0..rows).map(|_| how(&s, sampleable, d)).collect();
        let got = draw(&dev, &logits, vocab, &prompts, &fed, &hows);
        if d < 3 {
            assert_eq!(
                got,
                draw(&dev, &logits, vocab, &prompts, &fed, &hows),
                "draw {d}"
            );
        }
        for (b, &t) in got.iter().enumerate() {
            counts[b][t as usize] += 1;
        }
    }
    for b in 0..rows {
        let mut l = logits[b * vocab..(b + 1) * vocab].to_vec();
        l[sampleable..].fill(f32::NEG_INFINITY);
        let mut seen = prompts[b].clone();
        seen.push(fed[b]);
        penalize(&mut l, &seen, s.repetition_penalty);
        let dist = Sampler::new(&s, vocab).unwrap().distribution(&l).unwrap();
        let allowed: Vec<u32> = dist.iter().map(|d| d.0).collect();
        for (t, &c) in counts[b].iter().enumerate() {
            assert!(
                c == 0 || allowed.contains(&(t as u32)),
                "row {b}: drew {t} outside {allowed:?}"
            );
        }
        for (t, p) in dist {
            let f = counts[b][t as usize] as f64 / n as f64;
            assert!(
                (f - p).abs() < 0.08,
                "row {b}: token {t} drawn {f:.3}, p {p:.3}"
            );
        }
    }
    // NaN logits are reported, not drawn from.
    let mut bad = logits.clone();
    bad[2 * vocab + 17] = f32::NAN;
    let hows: Vec<SampleHow> = (0..rows).map(|_| how(&s, sampleable, 0)).collect();
    let got = draw(&dev, &bad, vocab, &prompts, &fed, &hows);
    assert_eq!(got[2], SAMPLE_NOT_FINITE);
    assert_ne!(got[1], SAMPLE_NOT_FINITE);
}
