use super::*;

use crate::test_rng::lcg;

/// A format's name, its values as the kernels must see them, and the matrix.
type Case = (String, Vec<f32>, Box<dyn Fn() -> MatRef<'static>>);

/// A matrix in every format, with its values as the kernels must see them (dequantised).
fn formats(w: &[f32], rows: usize, k: usize) -> Vec<Case> {
    let leak = |v: Vec<f32>| -> &'static [f32] { Box::leak(v.into_boxed_slice()) };
    let f32s = leak(w.to_vec());
    let bf: &'static [u16] = Box::leak(
        w.iter()
            .map(|&v| f32_to_bf16(v))
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let mut q = vec![0i8; rows * k];
    let scales: Vec<f32> = (0..rows)
        .map(|r| quantize_row(&w[r * k..(r + 1) * k], &mut q[r * k..(r + 1) * k]))
        .collect();
    let (rb, g) = (int4_row_bytes(k), int4_groups(k));
    let mut q4 = vec![0u8; rows * rb];
    let mut s4 = vec![0f32; rows * g];
    for r in 0..rows {
        quantize_row_int4(
            &w[r * k..(r + 1) * k],
            &mut q4[r * rb..(r + 1) * rb],
            &mut s4[r * g..(r + 1) * g],
        );
    }
    let i8v: Vec<f32> = (0..rows * k).map(|i| q[i] as f32 * scales[i / k]).collect();
    let mut i4v = vec![0f32; rows * k];
    for r in 0..rows {
        dequant_row_int4(&q4[r * rb..], &s4[r * g..], &mut i4v[r * k..(r + 1) * k]);
    }
    let (q, scales) = (Box::leak(q.into_boxed_slice()) as &[i8], leak(scales));
    let (q4, s4) = (Box::leak(q4.into_boxed_slice()) as &[u8], leak(s4));
    vec![
        (
            "f32".into(),
            w.to_vec(),
            Box::new(move || MatRef::F32(f32s)),
        ),
        (
            "bf16".into(),
            bf.iter().map(|&b| bf16_to_f32(b)).collect(),
            Box::new(move || MatRef::Bf16(bf)),
        ),
        (
            "int8".into(),
            i8v,
            Box::new(move || MatRef::Int8 { q, scales }),
        ),
        (
            "int4".into(),
            i4v,
            Box::new(move || MatRef::Int4 { q: q4, scales: s4 }),
        ),
    ]
}

/// The instruction sets this CPU runs, saying which it skips.
fn isas() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|i| {
            let ok = i.supported();
            if !ok {
                println!("skipping {}: not supported by this CPU", i.name());
            }
            ok
        })
        .collect()
}

/// What the kernels of `isa` multiply the weights `name` with: `x` itself, or for int8 and
/// int4 on VNNI each row of `x` rounded to int8 with the scale `max|x| / 127` (ties to even), for
/// bf16 on `avx512_bf16` `x` rounded to bf16.
pub(crate) fn seen_x(isa: Isa, name: &str, x: &[f32], k: usize) -> Vec<f32> {
    if isa == Isa::Avx512Bf16 && name == "bf16" {
        return x.iter().map(|&v| bf16_to_f32(f32_to_bf16(v))).collect();
    }
    if !(isa.has_vnni() && (name == "int8" || name == "int4")) {
        return x.to_vec();
    }
    x.chunks(k)
        .flat_map(|r| {
            let s = r.iter().fold(0f32, |a, &v| a.max(v.abs())) / 127.0;
            r.iter()
                .map(move |&v| (v * (1.0 / s)).round_ties_even() * s)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every ISA, format, odd row count, odd width and batch size agrees with an f64 product
/// over the dequantised weights (and, for int8 and int4 on VNNI, the int8-rounded activations).
#[test]
fn dot_rows_batch_matches_f64_for_every_format_isa_and_batch() {
    let mut s = 7u64;
    for &(rows, k) in &[
        (1, 1),
        (3, 7),
        (5, 16),
        (9, 33),
        (4, 100),
        (7, 257),
        (6, 64),
    ] {
        let w: Vec<f32> = (0..rows * k).map(|_| lcg(&mut s)).collect();
        for (name, wd, m) in formats(&w, rows, k) {
            for n in [1usize, 2, 3, 5, 6, 7, 8, 9, 17] {
                let x: Vec<f32> = (0..n * k).map(|_| lcg(&mut s)).collect();
                for isa in isas() {
                    let mut y = vec![f32::NAN; n * rows];
                    dot_rows_batch(isa, m(), 0, rows, &x, k, &mut |b, i, v| y[b * rows + i] = v);
                    let x = seen_x(isa, &name, &x, k);
                    for b in 0..n {
                        for r in 0..rows {
                            let e: f64 = (0..k)
                                .map(|j| wd[r * k + j] as f64 * x[b * k + j] as f64)
                                .sum();
                            let g = y[b * rows + r] as f64;
                            assert!(
                                (g - e).abs() <= 1e-5 * (1.0 + e.abs()) * (k as f64).sqrt(),
                                "{isa:?} {name} rows {rows} k {k} n {n} [{b},{r}]: {g} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A row's products come out with the same bits whatever the batch around it: a decode
/// step of one sequence (the batch-1 row streams) and the same sequence inside a batch of
/// 2 to 9 (the 4 × 4 and the wide tiles) must agree exactly, or batched decoding would drift
/// from single decoding. Not so on AVX2 (`Isa::Avx2Fma`), whose f32-widening tiles split the
/// sums differently at one activation row than at two (left as it was; named, not tested).
#[test]
fn a_row_gives_the_same_bits_alone_and_in_any_batch() {
    let mut s = 21u64;
    for &(rows, k) in &[(7, 257), (5, 64), (9, 100), (3, 2048)] {
        let w: Vec<f32> = (0..rows * k).map(|_| lcg(&mut s)).collect();
        let x: Vec<f32> = (0..9 * k).map(|_| lcg(&mut s)).collect();
        for (name, _, m) in formats(&w, rows, k) {
            for isa in isas().into_iter().filter(|&i| i != Isa::Avx2Fma) {
                let run = |n: usize| {
                    let mut y = vec![f32::NAN; n * rows];
                    dot_rows_batch(isa, m(), 0, rows, &x[..n * k], k, &mut |b, i, v| {
                        y[b * rows + i] = v
                    });
                    y
                };
                let alone = run(1);
                for n in [2usize, 4, 5, 8, 9] {
                    let y = run(n);
                    for r in 0..rows {
                        assert_eq!(
                            y[r].to_bits(),
                            alone[r].to_bits(),
                            "{isa:?} {name} rows {rows} k {k}: row {r} alone {} but {} in a batch of {n}",
                            alone[r],
                            y[r]
                        );
                    }
                }
            }
        }
    }
}

/// `dot_rows` from a row offset reads the right rows.
#[test]
fn dot_rows_from_an_offset_reads_those_rows() {
    let (rows, k) = (11, 70);
    let mut s = 9u64;
    let w: Vec<f32> = (0..rows * k).map(|_| lcg(&mut s)).collect();
    let x: Vec<f32> = (0..k).map(|_| lcg(&mut s)).collect();
    for (name, wd, m) in formats(&w, rows, k) {
        for isa in isas() {
            let mut y = vec![0f32; 5];
            dot_rows(isa, m(), 6, &x, &mut y);
            let x = seen_x(isa, &name, &x, k);
            for (i, g) in y.iter().enumerate() {
                let e: f64 = (0..k)
                    .map(|j| wd[(6 + i) * k + j] as f64 * x[j] as f64)
                    .sum();
                assert!((*g as f64 - e).abs() < 1e-4, "{isa:?} {name} row {}", 6 + i);
            }
        }
    }
}

/// The CPUID vendor check that picks the bf16 prefill path reads what Linux reports.
#[test]
fn the_cpu_vendor_is_the_one_linux_reports() {
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        println!("skipping: no /proc/cpuinfo");
        return;
    };
    let Some(vendor) = info
        .lines()
        .find(|l| l.starts_with("vendor_id"))
        .and_then(|l| l.split(':').nth(1))
    else {
        println!("skipping: /proc/cpuinfo names no vendor");
        return;
    };
    assert_eq!(cpu_vendor_is_amd(), vendor.trim() == "AuthenticAMD");
}
