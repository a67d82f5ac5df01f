//! The selective scan (`reference::ops::selective_scan`) in every tier: the CUDA kernels'
//! forward and backward against the reference (f64) on named shapes. (The simd twin is
//! checked against the reference in `simd/src/ops/selective_scan/bwd.rs` and, inside the
//! model, in `simd_inference.rs` and `simd_training.rs`.)
//!
//! Inputs are drawn per case from the distributions the op sees in training; every output
//! carries sentinel padding that must come back untouched (`gpu::ops`). The GPU tests skip
//! without a CUDA device; on the device: `bash scripts/gpu-tests.sh run`.

use conformance::gpu_ops::{f64s, normal, open, Report};
use conformance::tol::gpu as gpu_tol;
use conformance::{random_flags, seed_of};
use reference::ops::selective_scan::{
    selective_scan_bwd, selective_scan_fwd, ScanDims, ScanInputs,
};
use reference::rng::Rng;

// (name, batch, seq_len, d_inner, d_state, resets, h0, z)
type ScanCase = (&'static str, usize, usize, usize, usize, bool, bool, bool);
const SCAN_CASES: &[ScanCase] = &[
    ("decode_1tok", 1, 1, 64, 16, false, true, true),
    ("odd_lanes", 2, 7, 17, 16, false, false, true), // d_inner not a multiple of 16
    ("partial_chunk", 2, 129, 96, 16, true, true, true), // 4 chunks of 32 + 1
    ("d_state_3_no_z", 3, 70, 20, 3, true, true, false),
    ("d_state_32", 1, 65, 8, 32, false, true, true),
    ("mamba130m_prefill", 1, 512, 1536, 16, false, false, true),
];

#[test]
fn gpu_selective_scan_matches_reference() {
    let mut rep = Report(Vec::new());
    for &(name, batch, seq_len, di, ds, resets, h0, z) in SCAN_CASES {
        let Some(dev) = open("gpu_selective_scan_matches_reference", ds, 4) else {
            return;
        };
        let mut rng = Rng::new(seed_of(name));
        let n = batch * seq_len;
        let u = normal(&mut rng, n * di, 0.0, 1.0);
        let delta = normal(&mut rng, n * di, 0.0, 0.5);
        let a: Vec<f32> = (0..di * ds)
            .map(|_| -(rng.uniform(0.0, 16f64.ln())).exp() as f32)
            .collect();
        let b = normal(&mut rng, n * ds, 0.0, 1.0);
        let c = normal(&mut rng, n * ds, 0.0, 1.0);
        let d = normal(&mut rng, di, 1.0, 0.1);
        let zv = normal(&mut rng, n * di, 0.0, 1.0);
        let bias = normal(&mut rng, di, 0.0, 1.0);
        let flags = random_flags(&mut rng, n, 0.05);
        let h0v = normal(&mut rng, batch * di * ds, 0.0, 0.5);
        let dout = normal(&mut rng, n * di, 0.0, 1.0);
        let dims = ScanDims {
            batch,
            seq_len,
            d_inner: di,
            d_state: ds,
        };
        let inp32 = ScanInputs {
            u: &u,
            delta: &delta,
            a: &a,
            b: &b,
            c: &c,
            d: &d,
            z: z.then_some(&zv[..]),
            delta_bias: &bias,
            resets: resets.then_some(&flags[..]),
            h0: h0.then_some(&h0v[..]),
            dims,
        };
        // The reference in f64 on the same f32 values (A as the kernel sees it: −exp(ln(−a))).
        let a_dev: Vec<f32> = a.iter().map(|&v| -((-v).ln().exp())).collect();
        let (u6, de6, a6, b6, c6, d6, z6, bi6, h6, do6) = (
            f64s(&u),
            f64s(&delta),
            f64s(&a_dev),
            f64s(&b),
            f64s(&c),
            f64s(&d),
            f64s(&zv),
            f64s(&bias),
            f64s(&h0v),
            f64s(&dout),
        );
        let inp64 = ScanInputs {
            u: &u6,
            delta: &de6,
            a: &a6,
            b: &b6,
            c: &c6,
            d: &d6,
            z: z.then_some(&z6[..]),
            delta_bias: &bi6,
            resets: resets.then_some(&flags[..]),
            h0: h0.then_some(&h6[..]),
            dims,
        };
        let (out, last) = dev.selective_scan_fwd(&inp32).unwrap();
        let (wout, wlast) = selective_scan_fwd(&inp64);
        let t = gpu_tol::OP_F32_FWD;
        rep.cmp(format!("scan fwd {name}: out"), &out, &wout, t);
        rep.cmp(format!("scan fwd {name}: final state"), &last, &wlast, t);
        let g = dev.selective_scan_bwd(&inp32, &dout).unwrap();
        let w = selective_scan_bwd(&inp64, &do6);
        let t = gpu_tol::OP_F32_BWD;
        rep.cmp(format!("scan bwd {name}: du"), &g.u, &w.u, t);
        rep.cmp(format!("scan bwd {name}: ddelta"), &g.delta, &w.delta, t);
        rep.cmp(format!("scan bwd {name}: dA"), &g.a, &w.a, t);
        rep.cmp(format!("scan bwd {name}: dB"), &g.b, &w.b, t);
        rep.cmp(format!("scan bwd {name}: dC"), &g.c, &w.c, t);
        rep.cmp(format!("scan bwd {name}: dD"), &g.d, &w.d, t);
        rep.cmp(
            format!("scan bwd {name}: d delta_bias"),
            &g.delta_bias,
            &w.delta_bias,
            t,
        );
        rep.cmp(format!("scan bwd {name}: dh0"), &g.h0, &w.h0, t);
        if let (Some(gz), Some(wz)) = (&g.z, &w.z) {
            rep.cmp(format!("scan bwd {name}: dz"), gz, wz, t);
        }
    }
    rep.finish("gpu_selective_scan_matches_reference");
}
