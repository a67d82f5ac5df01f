//! RMSNorm / LayerNorm (`reference::ops::norm`) in every tier: the CUDA kernels' fused
//! residual add + norm forward and the norm backward against the reference (f64) on named
//! shapes. (The simd twin is checked inside the model, in `simd_inference.rs` and
//! `simd_training.rs`.)
//!
//! Inputs are drawn per case from the distributions the op sees in training; every output
//! carries sentinel padding that must come back untouched (`gpu::ops`). The GPU tests skip
//! without a CUDA device; on the device: `bash scripts/gpu-tests.sh run`.

use conformance::gpu_ops::{f64s, normal, open, Report};
use conformance::seed_of;
use conformance::tol::gpu as gpu_tol;
use reference::ops::norm::{norm_bwd, norm_fwd};
use reference::rng::Rng;
use reference::NormKind;

#[test]
fn gpu_add_norm_matches_reference() {
    // (name, kind, rows, d)
    let cases = [
        ("rms_odd", NormKind::Rms, 7, 17),
        ("layer_odd", NormKind::Layer, 5, 33),
        ("rms_mamba1.4b_rows", NormKind::Rms, 64, 2048),
        ("layer_768", NormKind::Layer, 300, 768),
    ];
    let mut rep = Report(Vec::new());
    for (name, kind, n, d) in cases {
        let Some(dev) = open("gpu_add_norm_matches_reference", 16, 4) else {
            return;
        };
        let mut rng = Rng::new(seed_of(name));
        let x = normal(&mut rng, n * d, 0.0, 1.0);
        let add = normal(&mut rng, n * d, 0.0, 0.5);
        let w = normal(&mut rng, d, 1.0, 0.1);
        let b = normal(&mut rng, d, 0.0, 0.1);
        let dy = normal(&mut rng, n * d, 0.0, 1.0);
        let bias = (kind == NormKind::Layer).then_some(&b[..]);
        let (resid, y, stats) = dev
            .add_norm_fwd(kind, &x, &add, &w, bias, 1e-5, n, d)
            .unwrap();
        let wres: Vec<f64> = x.iter().zip(&add).map(|(&a, &b)| (a + b) as f64).collect();
        let (w6, b6, dy6) = (f64s(&w), f64s(&b), f64s(&dy));
        let bias6 = (kind == NormKind::Layer).then_some(&b6[..]);
        let (wy, _) = norm_fwd(kind, &wres, &w6, bias6, 1e-5, n, d);
        rep.cmp(format!("norm fwd {name}: residual"), &resid, &wres, 0.0);
        rep.cmp(format!("norm fwd {name}: y"), &y, &wy, gpu_tol::OP_F32_FWD);
        let (dx, gw, gb) = dev.norm_bwd(kind, &resid, &w, &stats, &dy, n, d).unwrap();
        let (_, wstats) = norm_fwd(kind, &wres, &w6, bias6, 1e-5, n, d);
        let mut wgw = vec![0f64; d];
        let mut wgb = vec![0f64; d];
        let wdx = norm_bwd(
            kind,
            &wres,
            &w6,
            &wstats,
            &dy6,
            n,
            d,
            &mut wgw,
            Some(&mut wgb),
        );
        let t = gpu_tol::OP_F32_BWD;
        rep.cmp(format!("norm bwd {name}: dx"), &dx, &wdx, t);
        rep.cmp(format!("norm bwd {name}: grad_w"), &gw, &wgw, t);
        rep.cmp(format!("norm bwd {name}: grad_bias"), &gb, &wgb, t);
    }
    rep.finish("gpu_add_norm_matches_reference");
}
