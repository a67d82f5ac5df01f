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
    selective_scan_bwd, selective_scan_fwd, ScanDims, ScanGrads, ScanInputs,
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
    // The backward keeps each lane's states in lane-permuted register slots (state bits ≥ 2
    // flipped by lane bits, see RsLevel in selective_scan.cu) and folds resets into the decay:
    // every slot pattern of a warp, with resets, at each padded width it permutes.
    ("d_state_32_resets", 2, 97, 70, 32, true, true, true),
    ("d_state_13_padded_resets", 2, 75, 45, 13, true, true, true),
    ("d_state_8_resets", 2, 50, 40, 8, true, false, true),
    ("mamba130m_prefill", 1, 512, 1536, 16, false, false, true),
];

/// One case's inputs, drawn from its name's seed in the distributions the op sees in training.
struct CaseData {
    dims: ScanDims,
    resets: bool,
    h0: bool,
    z: bool,
    /// u, delta, a, b, c, d, z, bias, h0, dout.
    v: [Vec<f32>; 10],
    /// The same values in f64 (A as the kernel sees it: −exp(ln(−a))).
    w: [Vec<f64>; 10],
    flags: Vec<bool>,
}

impl CaseData {
    fn new(&(name, batch, seq_len, di, ds, resets, h0, z): &ScanCase) -> CaseData {
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
        let a_dev: Vec<f32> = a.iter().map(|&v| -((-v).ln().exp())).collect();
        let v = [u, delta, a, b, c, d, zv, bias, h0v, dout];
        let mut w = v.clone().map(|x| f64s(&x));
        w[2] = f64s(&a_dev);
        CaseData {
            dims: ScanDims {
                batch,
                seq_len,
                d_inner: di,
                d_state: ds,
            },
            resets,
            h0,
            z,
            v,
            w,
            flags,
        }
    }

    fn inputs<'a, T>(&'a self, v: &'a [Vec<T>; 10]) -> ScanInputs<'a, T> {
        ScanInputs {
            u: &v[0],
            delta: &v[1],
            a: &v[2],
            b: &v[3],
            c: &v[4],
            d: &v[5],
            z: self.z.then_some(&v[6][..]),
            delta_bias: &v[7],
            resets: self.resets.then_some(&self.flags[..]),
            h0: self.h0.then_some(&v[8][..]),
            dims: self.dims,
        }
    }
}

/// Every gradient of the device's backward against the reference's (f64), within
/// [`gpu_tol::OP_F32_BWD`].
fn cmp_grads(rep: &mut Report, what: &str, g: &ScanGrads<f32>, w: &ScanGrads<f64>) {
    let t = gpu_tol::OP_F32_BWD;
    let pairs: [(&str, &[f32], &[f64]); 8] = [
        ("du", &g.u, &w.u),
        ("ddelta", &g.delta, &w.delta),
        ("dA", &g.a, &w.a),
        ("dB", &g.b, &w.b),
        ("dC", &g.c, &w.c),
        ("dD", &g.d, &w.d),
        ("d delta_bias", &g.delta_bias, &w.delta_bias),
        ("dh0", &g.h0, &w.h0),
    ];
    for (name, got, want) in pairs {
        rep.cmp(format!("{what}: {name}"), got, want, t);
    }
    if let (Some(gz), Some(wz)) = (&g.z, &w.z) {
        rep.cmp(format!("{what}: dz"), gz, wz, t);
    }
}

#[test]
fn gpu_selective_scan_matches_reference() {
    let mut rep = Report(Vec::new());
    for case in SCAN_CASES {
        let (name, ds) = (case.0, case.4);
        let Some(dev) = open("gpu_selective_scan_matches_reference", ds, 4) else {
            return;
        };
        let data = CaseData::new(case);
        let (inp32, inp64) = (data.inputs(&data.v), data.inputs(&data.w));
        let (dout, do6) = (&data.v[9], &data.w[9]);
        let (out, last) = dev.selective_scan_fwd(&inp32).unwrap();
        let (wout, wlast) = selective_scan_fwd(&inp64);
        let t = gpu_tol::OP_F32_FWD;
        rep.cmp(format!("scan fwd {name}: out"), &out, &wout, t);
        rep.cmp(format!("scan fwd {name}: final state"), &last, &wlast, t);
        let g = dev.selective_scan_bwd(&inp32, dout).unwrap();
        let w = selective_scan_bwd(&inp64, do6);
        cmp_grads(&mut rep, &format!("scan bwd {name}"), &g, &w);
    }
    rep.finish("gpu_selective_scan_matches_reference");
}

/// The forward and the backward cut into segments that run side by side (a batch-1 prefill has too few blocks
/// to fill the GPU): each segment's start state comes from the ones before it through their
/// state maps. Resets fall inside and on segment edges, the last segment is partial, and the
/// initial state must flow through every map.
#[test]
fn gpu_selective_scan_segments_match_reference() {
    let mut rep = Report(Vec::new());
    const CASES: &[(ScanCase, &[usize])] = &[
        (
            ("seg_resets_h0", 2, 200, 40, 16, true, true, true),
            &[2, 3, 7],
        ),
        (("seg_h0_only", 1, 256, 130, 16, false, true, true), &[2, 8]),
        (("seg_d_state_3", 1, 97, 24, 3, true, true, false), &[4]),
        (
            ("seg_prefill_1536", 1, 1024, 1536, 16, false, false, true),
            &[32],
        ),
    ];
    for (case, segs) in CASES {
        let (name, ds) = (case.0, case.4);
        let Some(dev) = open("gpu_selective_scan_segments_match_reference", ds, 4) else {
            return;
        };
        let data = CaseData::new(case);
        let inp32 = data.inputs(&data.v);
        let inp64 = data.inputs(&data.w);
        let (wout, wlast) = selective_scan_fwd(&inp64);
        let wgrad = selective_scan_bwd(&inp64, &data.w[9]);
        let (one, _, ran) = dev.selective_scan_fwd_segs(&inp32, Some(1)).unwrap();
        assert_eq!(ran, 1, "{name}: one segment asked");
        for &k in *segs {
            let (out, last, ran) = dev.selective_scan_fwd_segs(&inp32, Some(k)).unwrap();
            // Segments are whole chunks: `k` of ceil(chunks / k) chunks each, fewer where
            // that covers the row.
            let per = case.2.div_ceil(dev.chunk()).div_ceil(k) * dev.chunk();
            assert_eq!(ran, case.2.div_ceil(per), "{name}: segments run");
            assert!(ran > 1, "{name}: {k} segments asked, one ran");
            let t = gpu_tol::OP_F32_FWD;
            rep.cmp(
                format!("scan fwd {name} / {k} segments: out"),
                &out,
                &wout,
                t,
            );
            rep.cmp(
                format!("scan fwd {name} / {k} segments: final state"),
                &last,
                &wlast,
                t,
            );
            rep.cmp(
                format!("scan fwd {name} / {k} segments against one"),
                &out,
                &f64s(&one),
                t,
            );
            // The backward in the same segments: each starts from the state gradient of the
            // later ones, folded through their maps.
            let g = dev
                .selective_scan_bwd_segs(&inp32, &data.v[9], Some(k))
                .unwrap();
            cmp_grads(
                &mut rep,
                &format!("scan bwd {name} / {k} segments"),
                &g,
                &wgrad,
            );
        }
    }
    rep.finish("gpu_selective_scan_segments_match_reference");
}

/// One decode step of the scan (`ssm_update_f32`: a few lanes a channel, several states a lane)
/// against the reference's one-position forward from the same state, at every state width's
/// lane layout: d_state 16 and 32 (16-byte loads on an aligned state, 4 and 8 lanes a channel),
/// 13 (padded to 16, one value at a time), 8 (2 lanes), 3 and 2 (one lane holds the channel).
/// Each case runs on an aligned and a misaligned state, which must give the same bits. Channel
/// counts leave the last block part empty; row 1 of every case starts a new document (its state
/// counts as zero), and the state around every case's rows stays untouched (sentinels).
#[test]
fn gpu_scan_update_matches_reference() {
    // (name, batch, seq_len, d_inner, d_state, resets, h0, z)
    const CASES: &[ScanCase] = &[
        ("update_ds16", 3, 1, 37, 16, true, true, true),
        ("update_ds16_two_blocks", 2, 1, 130, 16, true, true, false),
        ("update_ds13_padded", 3, 1, 37, 13, true, true, true),
        ("update_ds32", 2, 1, 45, 32, true, true, true),
        ("update_ds8", 2, 1, 70, 8, true, true, true),
        ("update_ds3", 3, 1, 20, 3, true, true, false),
        ("update_ds2", 2, 1, 300, 2, true, true, true),
        ("update_1_4b_width", 4, 1, 4096, 16, true, true, true),
    ];
    let mut rep = Report(Vec::new());
    for case in CASES {
        let (name, ds) = (case.0, case.4);
        let Some(dev) = open("gpu_scan_update_matches_reference", ds, 4) else {
            return;
        };
        let mut data = CaseData::new(case);
        data.flags.iter_mut().for_each(|f| *f = false);
        data.flags[1] = true;
        let (inp32, inp64) = (data.inputs(&data.v), data.inputs(&data.w));
        let (wout, wstate) = selective_scan_fwd(&inp64);
        let t = gpu_tol::OP_F32_FWD;
        let mut bits = Vec::new();
        for aligned in [true, false] {
            let (out, state) = dev.ssm_update(&inp32, aligned).unwrap();
            let what = format!("scan update {name} (state aligned: {aligned})");
            rep.cmp(format!("{what}: out"), &out, &wout, t);
            rep.cmp(format!("{what}: state"), &state, &wstate, t);
            bits.push([out, state].map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()));
        }
        // The 16-byte path and the one-value path run the same arithmetic.
        assert!(bits[0] == bits[1], "{name}: the two paths differ");
    }
    rep.finish("gpu_scan_update_matches_reference");
}
