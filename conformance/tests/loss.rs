//! The masked softmax cross-entropy (`reference::loss::cross_entropy`) in every tier: the simd
//! twin (`simd::loss`) against the reference, on named cases and random shapes, with the same
//! bits on 1 and 2 threads; the CUDA kernel against the reference (f64) on named shapes.
//!
//! The GPU test draws its inputs per case from the distributions the op sees in training; every
//! output carries sentinel padding that must come back untouched (`gpu::ops`). It skips without
//! a CUDA device; on the device: `bash scripts/gpu-tests.sh run`.

use conformance::gpu_ops::{f64s, normal, open, Report};
use conformance::tol::gpu as gpu_tol;
use conformance::tol::{SIMD_CE_GRAD_F32, SIMD_CE_LOSS_F32};
use conformance::{assert_close, diff, pool, random_flags, seed_of};
use proptest::prelude::*;
use reference::loss::cross_entropy;
use reference::rng::Rng;

fn check_loss(name: &str, n: usize, vocab: usize, masked: bool, scale: f32) -> (f64, f64) {
    let mut rng = Rng::new(conformance::seed_of(name));
    let logits: Vec<f32> = (0..n * vocab).map(|_| 3.0 * rng.normal() as f32).collect();
    let targets: Vec<u32> = (0..n).map(|_| rng.below(vocab as u64) as u32).collect();
    let mask = masked.then(|| random_flags(&mut rng, n, 0.7));
    let want = cross_entropy(&logits, &targets, mask.as_deref(), vocab, scale).unwrap();
    let mut first = None;
    let mut worst = (0.0f64, 0.0f64);
    for t in [1, 2] {
        let got =
            simd::loss::cross_entropy(&pool(t), &logits, &targets, mask.as_deref(), vocab, scale)
                .unwrap();
        assert_eq!(got.n_targets, want.n_targets, "{name}: n_targets");
        let dl = diff(&[got.loss], &[want.loss]).rel;
        assert!(
            dl <= SIMD_CE_LOSS_F32 && got.loss.is_finite(),
            "{name}: loss {} vs {} (relative {dl:.3e})",
            got.loss,
            want.loss
        );
        assert_close(
            &format!("{name}: d_logits"),
            &[n, vocab],
            &got.d_logits,
            &want.d_logits,
            SIMD_CE_GRAD_F32,
        );
        worst = (
            worst.0.max(dl),
            worst.1.max(diff(&got.d_logits, &want.d_logits).rel),
        );
        let bits: Vec<u32> = got
            .d_logits
            .iter()
            .map(|v| v.to_bits())
            .chain([got.loss.to_bits()])
            .collect();
        match &first {
            None => first = Some(bits),
            Some(f) => assert_eq!(f, &bits, "{name}: 1 and 2 threads differ"),
        }
    }
    println!(
        "{name}: loss relative error {:.3e}, d_logits {:.3e}",
        worst.0, worst.1
    );
    worst
}

#[test]
fn simd_cross_entropy_matches_reference() {
    for (name, n, vocab, masked, scale) in [
        ("ce_tiny_vocab", 5, 2, false, 1.0),
        ("ce_odd_vocab_masked", 37, 101, true, 0.25),
        ("ce_vocab_below_lanes", 9, 7, true, 1.0),
        ("ce_gpt2_vocab", 6, 50280, true, 0.5),
    ] {
        check_loss(name, n, vocab, masked, scale);
    }
}

#[test]
fn simd_cross_entropy_with_an_empty_mask_is_zero_and_rejects_bad_targets() {
    let logits = vec![0.5f32; 3 * 4];
    let p = pool(2);
    let out =
        simd::loss::cross_entropy(&p, &logits, &[1, 2, 3], Some(&[false; 3]), 4, 1.0).unwrap();
    assert_eq!((out.loss, out.n_targets), (0.0, 0));
    assert!(out.d_logits.iter().all(|&v| v == 0.0));
    assert!(simd::loss::cross_entropy(&p, &logits, &[1, 9, 3], None, 4, 1.0).is_err());
    assert!(simd::loss::cross_entropy(&p, &logits[1..], &[1, 2, 3], None, 4, 1.0).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, rng_seed: proptest::test_runner::RngSeed::Fixed(20261130), failure_persistence: None, ..ProptestConfig::default() })]
    /// Cross-entropy on random vocabularies and masks.
    #[test]
    fn simd_cross_entropy_matches_reference_on_random_shapes(n in 1usize..20, vocab in 1usize..300, masked in any::<bool>(), seed in 0u64..1_000_000) {
        check_loss(&format!("prop_ce_{seed}"), n, vocab, masked, 0.5);
    }
}

#[test]
fn gpu_cross_entropy_matches_reference() {
    // (name, rows, vocab, masked)
    let cases = [
        ("tiny", 3, 11, false),
        ("masked_odd", 9, 1001, true),
        ("vocab_50280", 4, 50280, true),
    ];
    let mut rep = Report(Vec::new());
    for (name, n, v, masked) in cases {
        let Some(dev) = open("gpu_cross_entropy_matches_reference", 16, 4) else {
            return;
        };
        let mut rng = Rng::new(seed_of(name));
        let logits = normal(&mut rng, n * v, 0.0, 3.0);
        let targets: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
        let mut mask = random_flags(&mut rng, n, 0.7);
        mask[0] = true;
        let m = masked.then_some(&mask[..]);
        let (loss, dl) = dev.cross_entropy(&logits, &targets, m, v, 0.5).unwrap();
        // The row staged in shared memory (where it fits the grant: every case here on sm_90)
        // and read three times from device memory sum in the same order: the same bits.
        let (loss3, dl3) = dev
            .cross_entropy_staging(&logits, &targets, m, v, 0.5, false)
            .unwrap();
        assert_eq!(loss.to_bits(), loss3.to_bits(), "{name}: staged loss");
        assert!(
            dl.iter().zip(&dl3).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}: the staged row gives other gradient bits"
        );
        let (granted, major) = dev.ce_stage_bytes();
        if major >= 9 {
            // sm_90 grants 227 KiB a block: the 50,280-token rows must be staged.
            assert!(
                granted >= v * 4,
                "{name}: no staging granted ({granted} bytes)"
            );
        }
        if granted >= v * 4 {
            println!("cross entropy {name}: row staged in shared memory, same bits as unstaged");
        }
        let want = cross_entropy(&f64s(&logits), &targets, m, v, 0.5).unwrap();
        rep.cmp(
            format!("cross entropy {name}: loss"),
            &[loss],
            &[want.loss],
            gpu_tol::OP_F32_FWD,
        );
        rep.cmp(
            format!("cross entropy {name}: d logits"),
            &dl,
            &want.d_logits,
            gpu_tol::OP_F32_FWD,
        );
    }
    rep.finish("gpu_cross_entropy_matches_reference");
}
