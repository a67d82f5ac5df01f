//! Single CUDA kernels against their `reference` twins on named shapes: the selective scan
//! forward and backward, conv1d forward and backward, the fused residual add + norm forward
//! and backward, and the fused cross-entropy. Inputs are drawn per case from the
//! distributions the ops see in training; every output carries sentinel padding that must
//! come back untouched (`gpu::ops`). Skips without a CUDA device.

use conformance::tol::gpu as gpu_tol;

use conformance::{diff, random_flags, seed_of};
use gpu::ops::OpDev;
use reference::float::silu;
use reference::loss::cross_entropy;
use reference::ops::conv1d::{conv1d_bwd, conv1d_fwd, ConvDims};
use reference::ops::norm::{norm_bwd, norm_fwd};
use reference::ops::selective_scan::{
    selective_scan_bwd, selective_scan_fwd, ScanDims, ScanInputs,
};
use reference::rng::Rng;
use reference::NormKind;

fn open(test: &str, d_state: usize, d_conv: usize) -> Option<OpDev> {
    if let Err(e) = gpu::available() {
        println!("skipping {test}: {e}");
        return None;
    }
    Some(OpDev::open(d_state, d_conv).unwrap_or_else(|e| panic!("{test}: {e}")))
}

fn normal(rng: &mut Rng, n: usize, mean: f64, sd: f64) -> Vec<f32> {
    (0..n).map(|_| (mean + sd * rng.normal()) as f32).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

struct Report(Vec<(String, f64, f64, bool)>);

impl Report {
    fn cmp(&mut self, what: String, got: &[f32], want: &[f64], limit: f64) {
        let d = diff(got, want);
        self.0.push((what, d.rel, limit, d.has_nan));
    }
    fn finish(self, test: &str) {
        let mut bad = Vec::new();
        for (w, e, l, nan) in &self.0 {
            let ok = !nan && e <= l;
            println!(
                "  {w:<60} {e:>11.3e} {l:>9.1e} {}",
                if ok { "" } else { "FAIL" }
            );
            if !ok {
                bad.push(w.clone());
            }
        }
        assert!(bad.is_empty(), "{test}: over the limit: {bad:?}");
    }
}

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
