//! The causal depthwise conv1d (`reference::ops::conv1d`) in every tier: the CUDA kernels'
//! forward (with the SiLU after it) and backward against the reference (f64) on named shapes.
//! (The simd twin is checked inside the model, in `simd_inference.rs` and
//! `simd_training.rs`.)
//!
//! Inputs are drawn per case from the distributions the op sees in training; every output
//! carries sentinel padding that must come back untouched (`gpu::ops`). The GPU tests skip
//! without a CUDA device; on the device: `bash scripts/gpu-tests.sh run`.

use conformance::gpu_ops::{f64s, normal, open, Report};
use conformance::tol::gpu as gpu_tol;
use conformance::{random_flags, seed_of};
use reference::float::silu;
use reference::ops::conv1d::{conv1d_bwd, conv1d_fwd, ConvDims};
use reference::rng::Rng;

// (name, batch, seq_len, d_inner, d_conv, resets, init, bias)
type ConvCase = (&'static str, usize, usize, usize, usize, bool, bool, bool);
const CONV_CASES: &[ConvCase] = &[
    ("decode_1tok", 2, 1, 24, 4, false, true, true),
    ("odd", 3, 13, 17, 4, true, true, true),
    ("dconv2_no_bias", 2, 40, 33, 2, true, false, false),
    ("dconv3", 1, 300, 64, 3, false, true, true),
];

#[test]
fn gpu_conv1d_matches_reference() {
    let mut rep = Report(Vec::new());
    for &(name, batch, seq_len, di, dc, resets, init, bias) in CONV_CASES {
        let Some(dev) = open("gpu_conv1d_matches_reference", 16, dc) else {
            return;
        };
        let mut rng = Rng::new(seed_of(name));
        let n = batch * seq_len;
        let x = normal(&mut rng, n * di, 0.0, 1.0);
        let w = normal(&mut rng, di * dc, 0.0, 0.5);
        let b = normal(&mut rng, di, 0.0, 0.5);
        let flags = random_flags(&mut rng, n, 0.1);
        let st = normal(&mut rng, batch * di * (dc - 1), 0.0, 0.5);
        let du = normal(&mut rng, n * di, 0.0, 1.0);
        let dims = ConvDims {
            batch,
            seq_len,
            d_inner: di,
            d_conv: dc,
        };
        let r = resets.then_some(&flags[..]);
        let (u, xs, last) = dev
            .conv1d_fwd(
                &x,
                &w,
                bias.then_some(&b[..]),
                r,
                init.then_some(&st[..]),
                dims,
            )
            .unwrap();
        let (x6, w6, b6, s6, du6) = (f64s(&x), f64s(&w), f64s(&b), f64s(&st), f64s(&du));
        let (wu, wlast) = conv1d_fwd(
            &x6,
            &w6,
            bias.then_some(&b6[..]),
            r,
            init.then_some(&s6[..]),
            dims,
        );
        let wxs: Vec<f64> = wu.iter().map(|&v| silu(v)).collect();
        rep.cmp(format!("conv fwd {name}: u"), &u, &wu, gpu_tol::OP_F32_FWD);
        rep.cmp(
            format!("conv fwd {name}: silu(u)"),
            &xs,
            &wxs,
            gpu_tol::OP_F32_FWD,
        );
        rep.cmp(
            format!("conv fwd {name}: final window"),
            &last,
            &wlast,
            gpu_tol::OP_F32_FWD,
        );
        let (dx, dinit, gw, gb) = dev
            .conv1d_bwd(&x, &w, &du, r, init.then_some(&st[..]), dims)
            .unwrap();
        let mut wgw = vec![0f64; di * dc];
        let mut wgb = vec![0f64; di];
        let (wdx, wdinit) = conv1d_bwd(
            &x6,
            &w6,
            &du6,
            r,
            init.then_some(&s6[..]),
            dims,
            &mut wgw,
            Some(&mut wgb),
        );
        let t = gpu_tol::OP_F32_BWD;
        rep.cmp(format!("conv bwd {name}: dx"), &dx, &wdx, t);
        rep.cmp(format!("conv bwd {name}: d init"), &dinit, &wdinit, t);
        rep.cmp(format!("conv bwd {name}: grad_w"), &gw, &wgw, t);
        rep.cmp(format!("conv bwd {name}: grad_bias"), &gb, &wgb, t);
    }
    rep.finish("gpu_conv1d_matches_reference");
}
