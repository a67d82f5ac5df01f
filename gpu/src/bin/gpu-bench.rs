//! `gpu-bench`: training tokens/s and MFU, the selective scan alone, prefill and decode on
//! one GPU. Run on the device: `target/gpu-tests/gpu-bench [train|scan|infer|all|profile|
//! train-long|gemv|decode-profile|prefill-profile|scan-segs]`.
//! `profile` prints the device time of every kernel and GEMM of one training step of the
//! 130M model at 16 × 2048 in bf16 (CUDA events around each launch, `VET_PROFILE=1`).
//!
//! Device time is measured with CUDA events around work that is synchronised inside the
//! timed region; end-to-end figures (training step, prefill, decode) use the host clock
//! around calls that synchronise. MFU = 6 · parameters · tokens/s ÷ 790 TFLOP/s (the measured
//! cuBLAS bf16 rate on the H200, shared/GPU.md).

use std::time::Instant;

use cudarc::driver::{result as drv, sys as drv_sys};
use gpu::cuda::Dev;
use gpu::kernels::KernelShape;
use gpu::ops::selective_scan::{
    scan_blocks, scan_fwd_segments, scan_reduce_bc, scan_seg_count, scan_seg_floats,
    selective_scan_bwd_build, selective_scan_fwd, ScanInF32, ScanReduceBcF32, SelectiveScanBwdF32,
    SelectiveScanFwdF32,
};
use gpu::params::{Ptr, PtrMut};
use gpu::{GpuEngine, GpuOptions, Precision};
use reference::model::Batch;
use reference::{AdamWConfig, InferenceEngine, MambaConfig, State, TrainingEngine};

const PEAK: f64 = 790e12;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn gib(b: f64) -> f64 {
    b / 1073741824.0
}

fn used_memory() -> f64 {
    gib(gpu::bench::used_memory() as f64)
}

/// The training benchmark's sizes (name, d_model, n_layer, batch, seq_len);
/// `VET_TRAIN_SIZES=130M,1.4B` narrows them.
const TRAIN: [(&str, usize, usize, usize, usize); 3] = [
    ("130M", 768, 24, 16, 2048),
    ("370M", 1024, 48, 8, 2048),
    ("1.4B", 2048, 48, 8, 2048),
];

/// The 1.4B at longer sequences, the same tokens per step as at 8 × 2048.
const TRAIN_LONG: [(&str, usize, usize, usize, usize); 2] =
    [("1.4B", 2048, 48, 2, 8192), ("1.4B", 2048, 48, 1, 16384)];

fn train(
    rows: &mut Vec<String>,
    sizes: &[(&str, usize, usize, usize, usize)],
) -> reference::Result<()> {
    let only = std::env::var("VET_TRAIN_SIZES").unwrap_or_default();
    for &(name, d_model, n_layer, batch, seq) in sizes {
        if !only.is_empty() && !only.split(',').any(|o| o == name) {
            continue;
        }
        let cfg = MambaConfig::new(d_model, n_layer, 50280);
        let p = gpu::bench::params(&cfg);
        let n_params = p.numel() as f64;
        let mut e = GpuEngine::new(
            &cfg,
            p,
            &GpuOptions {
                ordinal: 0,
                precision: Precision::Bf16,
            },
        )?;
        let toks = gpu::bench::tokens(batch * seq + 1, cfg.vocab_size, 7);
        let (inp, tgt) = (&toks[..batch * seq], &toks[1..]);
        let b = Batch::new(inp, batch, seq);
        let hp = AdamWConfig::default();
        let mut times = Vec::new();
        let mut loss = 0.0;
        for it in 0..8 {
            let t0 = Instant::now();
            e.zero_grad()?;
            loss = e.loss_and_backward(&b, tgt, None, None, 1.0)?.loss;
            e.optimizer_step(&hp, 1e-4)?;
            if it >= 3 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let t = median(times);
        let tps = (batch * seq) as f64 / t;
        let mfu = 6.0 * n_params * tps / PEAK;
        let act = e.train_activation_bytes_per_token().unwrap_or(0.0);
        let layer = e.train_layer_bytes_per_token().unwrap_or(0.0);
        let mem = used_memory();
        rows.push(format!(
            "train {name:<5} {d_model}x{n_layer} batch {batch}x{seq}: {:.0} params, step {:.3} s, {:.0} tokens/s, MFU {:.1} %, loss {:.3}, activations {:.1} KiB/token ({:.0} B/token/layer kept, {:.1} GiB for the batch), device memory used {:.1} GiB",
            n_params, t, tps, 100.0 * mfu, loss, act / 1024.0, layer, gib(act * (batch * seq) as f64), mem
        ));
        println!("{}", rows.last().unwrap());
        let parts = e.memory_breakdown();
        let held: usize = parts.iter().map(|p| p.1).sum();
        let mut line = format!("  memory {name}:");
        for (what, bytes) in parts.iter().filter(|p| p.1 > 0) {
            line += &format!(" {what} {:.2} GiB,", gib(*bytes as f64));
        }
        line += &format!(
            " other (context, cuBLAS, sum of the above vs in use) {:.2} GiB",
            mem - gib(held as f64)
        );
        println!("{line}");
        rows.push(line);
    }
    Ok(())
}

/// One training step of the 130M model at 16 × 2048 (bf16) with every launch timed: the
/// per-label table (Markdown), then the totals per kind.
fn profile(rows: &mut Vec<String>) -> reference::Result<()> {
    // Read when the engine opens its device; nothing else runs in this process yet.
    std::env::set_var("VET_PROFILE", "1");
    let (batch, seq) = (16, 2048);
    let (cfg, mut e) = bf16_engine(768, 24)?;
    let toks = gpu::bench::tokens(batch * seq + 1, cfg.vocab_size, 7);
    let b = Batch::new(&toks[..batch * seq], batch, seq);
    let hp = AdamWConfig::default();
    let mut wall = 0.0;
    for it in 0..3 {
        if it == 2 {
            e.profile_reset();
        }
        let t0 = Instant::now();
        e.zero_grad()?;
        e.loss_and_backward(&b, &toks[1..], None, None, 1.0)?;
        e.optimizer_step(&hp, 1e-4)?;
        wall = t0.elapsed().as_secs_f64() * 1e3;
    }
    let (prows, span) = e.profile_rows().unwrap_or_default();
    let total: f64 = prows.iter().map(|r| r.ms).sum();
    println!("{}", gpu::profile::format_table(&prows, total));
    let kind = |l: &str| {
        if l.contains(" gemm ") {
            "GEMMs"
        } else if l.contains("selective_scan") || l.contains("scan_reduce") {
            "scan"
        } else {
            "other kernels"
        }
    };
    for k in ["GEMMs", "scan", "other kernels"] {
        let (ms, n) = prows
            .iter()
            .filter(|r| kind(&r.label) == k)
            .fold((0.0, 0), |a, r| (a.0 + r.ms, a.1 + r.count));
        rows.push(format!(
            "profile 130M 16x2048 bf16: {k}: {ms:.1} ms in {n} launches ({:.1} % of the launches' time)",
            100.0 * ms / total.max(1e-9)
        ));
    }
    rows.push(format!(
        "profile 130M 16x2048 bf16: launches {total:.1} ms, first launch to last {span:.1} ms, host wall time of the profiled step {wall:.1} ms"
    ));
    Ok(())
}

struct Events(drv_sys::CUevent, drv_sys::CUevent);

impl Events {
    fn new() -> Events {
        let f = drv_sys::CUevent_flags::CU_EVENT_DEFAULT;
        Events(
            drv::event::create(f).expect("event"),
            drv::event::create(f).expect("event"),
        )
    }
    fn time(&self, dev: &Dev, mut f: impl FnMut()) -> f64 {
        // SAFETY: events and stream belong to the current context.
        unsafe {
            drv::event::record(self.0, dev.cu_stream()).expect("record");
            f();
            drv::event::record(self.1, dev.cu_stream()).expect("record");
            drv::event::synchronize(self.1).expect("sync");
            drv::event::elapsed(self.0, self.1).expect("elapsed") as f64 * 1e-3
        }
    }
}

fn scan(rows: &mut Vec<String>) -> reference::Result<()> {
    for chunk in [16, 32, 64] {
        scan_one(rows, chunk, (8, 4096, 2048), true)?;
    }
    Ok(())
}

/// The scan forward in one segment and in the segments the engine plans, at the shapes of a
/// batch-1 prefill (130M, 1.4B), of long-sequence training and of the 8 × 2048 one.
fn scan_segs(rows: &mut Vec<String>) -> reference::Result<()> {
    for shape in [
        (1, 1536, 2048),
        (1, 4096, 2048),
        (1, 4096, 16384),
        (2, 4096, 8192),
        (16, 1536, 2048),
        (8, 4096, 2048),
    ] {
        scan_one(rows, 32, shape, false)?;
    }
    Ok(())
}

/// `k` seeded values uniform in `off ± scale / 2`.
fn rnd(k: usize, scale: f32, off: f32, seed: u64) -> Vec<f32> {
    gpu::bench::tokens(k, 1 << 20, seed)
        .iter()
        .map(|&t| off + scale * (t as f32 / (1 << 20) as f32 - 0.5))
        .collect()
}

fn scan_one(
    rows: &mut Vec<String>,
    chunk: usize,
    (batch, di, seq): (usize, usize, usize),
    backward: bool,
) -> reference::Result<()> {
    let (ds, r) = (16usize, 128usize);
    let shape = KernelShape {
        chunk,
        d_state_pad: 16,
        d_conv: 4,
    };
    let dev = std::sync::Arc::new(Dev::open(0, shape, &gpu::ops::all_kernels())?);
    let n = batch * seq;
    let xr = r + 2 * ds;
    let u = dev.upload(&rnd(n * di, 2.0, 0.0, 1))?;
    let delta = dev.upload(&rnd(n * di, 2.0, -3.0, 2))?;
    let xbc = dev.upload(&rnd(n * xr, 2.0, 0.0, 3))?;
    let z = dev.upload(&rnd(n * 2 * di, 2.0, 0.0, 4))?;
    let a_log = dev.upload(
        &(0..di * ds)
            .map(|i| ((i % ds) as f32 + 1.0).ln())
            .collect::<Vec<_>>(),
    )?;
    let dvec = dev.upload(&vec![1.0f32; di])?;
    let dtb = dev.upload(&vec![0.0f32; di])?;
    let starts = dev.upload(&vec![-1i32; n])?;
    let out = dev.alloc(4 * n * di)?;
    let chunks = dev.alloc(4 * batch * seq.div_ceil(chunk) * di * ds)?;
    let last = dev.alloc(4 * batch * di * ds)?;
    let dout = dev.upload(&rnd(n * di, 1.0, 0.0, 5))?;
    let (du, ddelta, dz) = (
        dev.alloc(4 * n * di)?,
        dev.alloc(4 * n * di)?,
        dev.alloc(4 * n * 2 * di)?,
    );
    let nblk = scan_blocks(di);
    let part_bc = dev.alloc(4 * nblk * n * 2 * ds)?;
    let (pa, pd, pdb) = (
        dev.alloc(4 * batch * di * ds)?,
        dev.alloc(4 * batch * di)?,
        dev.alloc(4 * batch * di)?,
    );
    let dxbc = dev.alloc(4 * n * xr)?;
    let seg_len = scan_fwd_segments(dev.sm_count, batch, seq, di, chunk)?;
    let seg_floats = scan_seg_floats(batch, seq, di, ds, seg_len);
    let seg = dev.alloc(4 * 2 * seg_floats)?;
    let scan = ScanInF32 {
        u: Ptr::new(u.ptr),
        delta: Ptr::new(delta.ptr),
        a_log: Ptr::new(a_log.ptr),
        xbc: Ptr::new(xbc.ptr),
        ldbc: xr as i64,
        col_b: r as i64,
        dvec: Ptr::new(dvec.ptr),
        z: Ptr::new(z.at::<f32>(di)),
        ldz: 2 * di as i64,
        dt_bias: Ptr::new(dtb.ptr),
        starts: Ptr::new(starts.ptr),
    };
    let (b, l, d_inner, d_state) = (batch as i64, seq as i64, di as i64, ds as i64);
    let fwd_p = SelectiveScanFwdF32 {
        scan,
        h0: Ptr::NULL,
        out: PtrMut::new(out.ptr),
        chunk_states: PtrMut::new(chunks.ptr),
        last: PtrMut::new(last.ptr),
        batch: b,
        seq_len: l,
        d_inner,
        d_state,
        out_lp: PtrMut::NULL,
        lp_mode: 0,
        seg_len: 0,
        seg_p: PtrMut::new(seg.ptr),
        seg_q: PtrMut::new(seg.at::<f32>(seg_floats)),
        seg_pass: 0,
    };
    let fwd_seg_p = SelectiveScanFwdF32 {
        seg_len: seg_len as i64,
        ..fwd_p
    };
    let bwd_p = SelectiveScanBwdF32 {
        scan,
        chunk_states: Ptr::new(chunks.ptr),
        dout: Ptr::new(dout.ptr),
        du_out: PtrMut::new(du.ptr),
        ddelta_out: PtrMut::new(ddelta.ptr),
        dz_out: PtrMut::new(dz.at::<f32>(di)),
        ldz_out: 2 * di as i64,
        part_bc: PtrMut::new(part_bc.ptr),
        part_a: PtrMut::new(pa.ptr),
        part_d: PtrMut::new(pd.ptr),
        part_db: PtrMut::new(pdb.ptr),
        dh_last: Ptr::NULL,
        dh0: PtrMut::NULL,
        batch: b,
        seq_len: l,
        d_inner,
        d_state,
        gated_lp: PtrMut::NULL,
        ddelta_lp: PtrMut::NULL,
        dz_lp: PtrMut::NULL,
        lp_mode: 0,
        seg_len: 0,
        seg_p: PtrMut::new(seg.ptr),
        seg_q: PtrMut::new(seg.at::<f32>(seg_floats)),
    };
    let bwd_seg_p = SelectiveScanBwdF32 {
        seg_len: seg_len as i64,
        ..bwd_p
    };
    let reduce_p = ScanReduceBcF32 {
        part_bc: Ptr::new(part_bc.ptr),
        n_blocks: nblk as i64,
        rows: n as i64,
        d_state,
        out: PtrMut::new(dxbc.at::<f32>(r)),
        ldo: xr as i64,
    };
    // SAFETY (the three closures): every buffer above is allocated at the kernels' extents
    // for (batch, seq, d_inner, d_state) and this device's chunk.
    let fwd = || unsafe { selective_scan_fwd(&dev, &fwd_p) }.expect("scan fwd");
    if !backward {
        // One segment against the planned ones, forward and backward (the partials are
        // sized for `segs` rows of `batch`).
        let segs = scan_seg_count(seq, seg_len);
        let (pa, pd, pdb) = (
            dev.alloc(4 * segs * batch * di * ds)?,
            dev.alloc(4 * segs * batch * di)?,
            dev.alloc(4 * segs * batch * di)?,
        );
        let parts = |p: SelectiveScanBwdF32| SelectiveScanBwdF32 {
            part_a: PtrMut::new(pa.ptr),
            part_d: PtrMut::new(pd.ptr),
            part_db: PtrMut::new(pdb.ptr),
            ..p
        };
        let (b1, bs) = (parts(bwd_p), parts(bwd_seg_p));
        let k = gpu::kernels::scan_bwd_kernel();
        // SAFETY: as above; `seg` holds both maps of `seg_len`, the partials `segs` rows.
        let fwd_seg = || unsafe { selective_scan_fwd(&dev, &fwd_seg_p) }.expect("scan fwd");
        let bwd_one = || unsafe { selective_scan_bwd_build(&dev, k, &b1) }.expect("scan bwd");
        let bwd_seg = || unsafe { selective_scan_bwd_build(&dev, k, &bs) }.expect("scan bwd");
        let ev = Events::new();
        for _ in 0..3 {
            fwd();
            bwd_one();
            fwd_seg();
            bwd_seg();
        }
        let t = |f: &dyn Fn()| median((0..10).map(|_| ev.time(&dev, f)).collect());
        let (f1, fs, b1t, bst) = (t(&fwd), t(&fwd_seg), t(&bwd_one), t(&bwd_seg));
        rows.push(format!(
            "scan B {batch} d_inner {di} L {seq}, one segment / {segs} segments of {seg_len}: forward {:.3} / {:.3} ms ({:.2}x), backward {:.3} / {:.3} ms ({:.2}x)",
            f1 * 1e3, fs * 1e3, f1 / fs, b1t * 1e3, bst * 1e3, b1t / bst
        ));
        println!("{}", rows.last().unwrap());
        return Ok(());
    }
    let bwd = |kernel: &'static str, reduce: bool| {
        // SAFETY: see above.
        unsafe { selective_scan_bwd_build(&dev, kernel, &bwd_p) }.expect("scan bwd");
        if reduce {
            // SAFETY: see above.
            unsafe { scan_reduce_bc(&dev, &reduce_p) }.expect("reduce");
        }
    };
    let (tf, tb, tb2, tbr) = time_scan(&dev, &fwd, &bwd);
    rows.push(format!(
        "scan B {batch} d_inner {di} L {seq} d_state {ds} chunk {chunk} (f32 inputs, z gate, dt bias + softplus): forward {:.3} ms, backward {:.3} ms (1 block/SM build) / {:.3} ms (2 blocks/SM build); engine's build + dB/dC reduction: {:.3} ms",
        tf * 1e3, tb * 1e3, tb2 * 1e3, tbr * 1e3
    ));
    println!("{}", rows.last().unwrap());
    Ok(())
}

/// Median device times (s) of the scan forward, the two backward builds, and the engine's
/// backward build with the dB/dC reduction, after 3 warm-up rounds.
fn time_scan(dev: &Dev, fwd: &dyn Fn(), bwd: &dyn Fn(&'static str, bool)) -> (f64, f64, f64, f64) {
    let ev = Events::new();
    for _ in 0..3 {
        fwd();
        bwd("selective_scan_bwd_f32", true);
        bwd("selective_scan_bwd_2b_f32", true);
    }
    let tf = median((0..10).map(|_| ev.time(dev, fwd)).collect());
    let tb = median(
        (0..10)
            .map(|_| ev.time(dev, || bwd("selective_scan_bwd_f32", false)))
            .collect(),
    );
    let tb2 = median(
        (0..10)
            .map(|_| ev.time(dev, || bwd("selective_scan_bwd_2b_f32", false)))
            .collect(),
    );
    let tbr = median(
        (0..10)
            .map(|_| ev.time(dev, || bwd(gpu::kernels::scan_bwd_kernel(), true)))
            .collect(),
    );
    (tf, tb, tb2, tbr)
}

/// Prefill (one 2048-token sequence) and decode at batch 1, 8, 64 and 256 (a held state of
/// that many rows, one greedy token per row per step): with the ids drawn on the device
/// (`step_held_sample`, what continuous batching does) and with the logits copied to the host
/// for a host argmax (the path before it). `VET_DECODE_GEMV=0` runs the projections through
/// cuBLAS instead of the GEMV, for a before/after on one card.
fn infer(rows: &mut Vec<String>) -> reference::Result<()> {
    let gemv = std::env::var("VET_DECODE_GEMV").map_or(true, |v| v != "0");
    // VET_INFER_INT8=1: in_proj, x_proj and out_proj as int8 rows (`quantize_int8`).
    let int8 = std::env::var("VET_INFER_INT8").is_ok_and(|v| v == "1");
    for (name, d_model, n_layer) in infer_sizes() {
        let (cfg, mut e) = bf16_engine(d_model, n_layer)?;
        let mut weights = 2.0 * e.layout().numel as f64;
        let name = if int8 {
            e.quantize_int8(quantize_row_i8)?;
            let per_layer = cfg.d_inner * (3 * cfg.d_model + cfg.x_proj_rows());
            weights -= (cfg.n_layer * per_layer) as f64;
            format!("{name} int8")
        } else {
            name.to_string()
        };
        let prompt = gpu::bench::tokens(2048, cfg.vocab_size, 11);
        let mut logits = vec![0f32; cfg.vocab_size];
        let mut tp = Vec::new();
        for _ in 0..4 {
            let mut st = State::<f32>::zeros(&cfg, 1);
            let t0 = Instant::now();
            e.prefill(&prompt, &mut st, &mut logits)?;
            tp.push(t0.elapsed().as_secs_f64());
        }
        let tp = median(tp[1..].to_vec());
        rows.push(format!(
            "infer {name:<5} prefill 2048 tokens: {:.1} ms = {:.0} tokens/s",
            tp * 1e3,
            2048.0 / tp
        ));
        println!("{}", rows.last().unwrap());
        for batch in infer_batches() {
            let (td, th) = decode_at(&mut e, &cfg, batch)?;
            rows.push(format!(
                "infer {name:<5} decode batch {batch:>3} ({}): ids drawn on the device {:.3} ms/step = {:.0} tokens/s ({:.0} GB/s of weights); logits to the host {:.3} ms/step = {:.0} tokens/s (CUDA graph: {})",
                if e.decode_ran_persistent() { "persistent" } else if gemv && batch <= gpu::ops::decode::GEMV_ROWS { "GEMV on" } else { "GEMV off" },
                td * 1e3, batch as f64 / td, weights / td / 1e9, th * 1e3, batch as f64 / th, e.decode_uses_graph()
            ));
            println!("{}", rows.last().unwrap());
            if let Some(t) = e.decode_trace()? {
                rows.push(format!(
                    "infer {name:<5} decode batch {batch:>3}: {}",
                    trace_table(&t)
                ));
                println!("{}", rows.last().unwrap());
            }
        }
    }
    Ok(())
}

/// Symmetric int8 rows (`max|w| / 127`, ties away from zero), the CPU tier's rule, for
/// `VET_INFER_INT8` (the bench's random weights need no bit-exact match).
fn quantize_row_i8(w: &[f32], q: &mut [i8]) -> f32 {
    let amax = w.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let s = if amax > 0.0 && amax.is_finite() {
        amax / 127.0
    } else {
        1.0
    };
    for (o, &v) in q.iter_mut().zip(w) {
        *o = (v / s).round().clamp(-127.0, 127.0) as i8;
    }
    s
}

/// The persistent kernel's phases (µs, mean over layers 1..) from its clock marks.
fn trace_table(t: &[u64]) -> String {
    use gpu::ops::decode_layers::DL_TRACE;
    const NAMES: [&str; 11] = [
        "barrier to A",
        "norm",
        "in_proj",
        "epilogue",
        "barrier to B",
        "x_proj",
        "arrive + scan loads",
        "wait to C",
        "scan",
        "barrier to D (+ A's loads)",
        "out_proj",
    ];
    let layers: Vec<&[u64]> = t.chunks(DL_TRACE).skip(1).collect();
    let n = layers.len().max(1) as f64;
    let mut parts = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let us: f64 = layers
            .iter()
            .map(|l| l[i + 1].saturating_sub(l[i]) as f64)
            .sum::<f64>()
            / n
            / 1e3;
        parts.push(format!("{name} {us:.2}"));
    }
    for (i, name) in ["in_proj", "x_proj", "out_proj"].iter().enumerate() {
        let us: f64 = layers.iter().map(|l| l[12 + i] as f64).sum::<f64>() / n / 1e3;
        parts.push(format!("waiting for {name}'s weights {us:.2}"));
    }
    let per_layer: f64 = layers
        .iter()
        .map(|l| l[11].saturating_sub(l[0]) as f64)
        .sum::<f64>()
        / n
        / 1e3;
    format!("per layer {per_layer:.2} us: {}", parts.join(", "))
}

/// The inference sizes (name, d_model, n_layer), narrowed by `VET_INFER_SIZES` (e.g. `1.4B`).
fn infer_sizes() -> Vec<(&'static str, usize, usize)> {
    let only = std::env::var("VET_INFER_SIZES").unwrap_or_default();
    [("130M", 768, 24), ("370M", 1024, 48), ("1.4B", 2048, 48)]
        .into_iter()
        .filter(|s| only.is_empty() || only.split(',').any(|o| o == s.0))
        .collect()
}

/// The decode batches, narrowed by `VET_INFER_BATCHES` (e.g. `1,8`).
fn infer_batches() -> Vec<usize> {
    match std::env::var("VET_INFER_BATCHES") {
        Ok(v) if !v.is_empty() => v.split(',').filter_map(|b| b.parse().ok()).collect(),
        _ => vec![1, 8, 64, 256],
    }
}

/// A bf16 engine with the bench's parameters for a `d_model` × `n_layer` model.
fn bf16_engine(d_model: usize, n_layer: usize) -> reference::Result<(MambaConfig, GpuEngine)> {
    let cfg = MambaConfig::new(d_model, n_layer, 50280);
    let opts = GpuOptions {
        ordinal: 0,
        precision: Precision::Bf16,
    };
    let e = GpuEngine::new(&cfg, gpu::bench::params(&cfg), &opts)?;
    Ok((cfg, e))
}

/// Per-launch device times of a 2048-token batch-1 prefill (`VET_INFER_SIZES`), eager
/// launches with events around each.
fn prefill_profile(rows: &mut Vec<String>) -> reference::Result<()> {
    // Read when the engine opens its device; nothing else runs in this process yet.
    std::env::set_var("VET_PROFILE", "1");
    for (name, d_model, n_layer) in infer_sizes() {
        let (cfg, mut e) = bf16_engine(d_model, n_layer)?;
        let prompt = gpu::bench::tokens(2048, cfg.vocab_size, 11);
        let mut logits = vec![0f32; cfg.vocab_size];
        for it in 0..3 {
            if it == 2 {
                e.profile_reset();
            }
            let mut st = State::<f32>::zeros(&cfg, 1);
            e.prefill(&prompt, &mut st, &mut logits)?;
        }
        let (prows, span) = e.profile_rows().unwrap_or_default();
        let total: f64 = prows.iter().map(|r| r.ms).sum();
        println!("prefill {name} 2048 tokens:");
        println!("{}", gpu::profile::format_table(&prows, total));
        rows.push(format!(
            "prefill-profile {name} 2048 tokens: launches {total:.3} ms, first launch to last {span:.3} ms"
        ));
    }
    Ok(())
}

/// Per-launch device times of decode steps (eager, `VET_PROFILE=1`, no CUDA graph), per
/// step, for each size and batch of [`infer_sizes`] / [`infer_batches`].
fn decode_profile(rows: &mut Vec<String>) -> reference::Result<()> {
    // Read when the engine opens its device; nothing else runs in this process yet.
    std::env::set_var("VET_PROFILE", "1");
    std::env::set_var("VET_CUDA_GRAPHS", "0");
    const STEPS: usize = 8;
    for (name, d_model, n_layer) in infer_sizes() {
        let (cfg, mut e) = bf16_engine(d_model, n_layer)?;
        let v = cfg.vocab_size;
        for batch in infer_batches() {
            let held = e
                .hold_state(&State::<f32>::zeros(&cfg, batch))?
                .expect("the CUDA engine holds states");
            let how = vec![reference::RowSampling::greedy(v as u32); batch];
            let mut ids = gpu::bench::tokens(batch, v, 3);
            for it in 0..STEPS + 3 {
                if it == 3 {
                    e.profile_reset();
                }
                let feed = ids.clone();
                e.step_held_sample(held, &feed, &how, &mut ids)?;
            }
            let (mut prows, span) = e.profile_rows().unwrap_or_default();
            for r in &mut prows {
                r.ms /= STEPS as f64;
                r.count /= STEPS;
            }
            let total: f64 = prows.iter().map(|r| r.ms).sum();
            println!("decode {name} batch {batch}, per step:");
            println!("{}", gpu::profile::format_table(&prows, total));
            rows.push(format!(
                "decode-profile {name} batch {batch}: launches {:.3} ms/step, first launch to last {:.3} ms/step",
                total,
                span / STEPS as f64
            ));
        }
    }
    Ok(())
}

/// Random bf16 bits: values uniform in ±scale/2.
fn rnd_bf16(k: usize, scale: f32, seed: u64) -> Vec<u16> {
    rnd(k, scale, 0.0, seed)
        .iter()
        .map(|x| (x.to_bits() >> 16) as u16)
        .collect()
}

/// The decode projections alone: `gemv_lp` and its variants at every split, at batch 1 and 8,
/// in µs per launch and GB/s of weights read, against a device-to-device copy. Each launch
/// reads another copy of the weight, so none is served from L2.
fn gemv_bench(rows: &mut Vec<String>) -> reference::Result<()> {
    use gpu::ops::decode::{gemv_named, GemvLp};
    let shape = KernelShape {
        chunk: 16,
        d_state_pad: 16,
        d_conv: 4,
    };
    let dev = std::sync::Arc::new(Dev::open(0, shape, &gpu::ops::all_kernels())?);
    let ev = Events::new();
    let pool_bytes = 448usize << 20;
    let pool = dev.upload(&rnd_bf16(pool_bytes / 2, 0.1, 9))?;
    let copy = dev.alloc(pool_bytes / 2)?;
    let tc = median(
        (0..7)
            .map(|_| {
                ev.time(&dev, || {
                    copy.copy_from(0, &pool, pool_bytes / 2).expect("copy")
                })
            })
            .collect(),
    );
    let copy_gbs = pool_bytes as f64 / tc / 1e9;
    rows.push(format!(
        "gemv: device copy of {} MiB: {copy_gbs:.0} GB/s (read + write)",
        pool_bytes >> 21
    ));
    println!("{}", rows.last().unwrap());
    let x = dev.upload(&rnd_bf16(8 * 8192, 2.0, 4))?;
    let y = dev.alloc(4 * 8 * 65536)?;
    let shapes = [
        ("1.4B in_proj", 8192usize, 2048usize),
        ("1.4B out_proj", 2048, 4096),
        ("1.4B x_proj", 160, 4096),
        ("1.4B dt_proj", 4096, 128),
        ("1.4B lm_head", 50280, 2048),
        ("130M in_proj", 3072, 768),
        ("130M out_proj", 768, 1536),
    ];
    // int8 weights: the pool's bytes as codes (any byte is one), one scale a row.
    let scales = dev.upload(&vec![0.01f32; 65536])?;
    for ((what, n, k), q8) in shapes
        .iter()
        .flat_map(|&sh| [false, true].map(move |q| (sh, q)))
    {
        let wbytes = n * k * if q8 { 1 } else { 2 };
        let copies = (pool_bytes / wbytes).max(1);
        let reps = 24usize;
        for nrows in [1usize, 8] {
            let mut refs: Vec<(i32, Vec<f32>)> = Vec::new();
            let fmt = if q8 { "int8" } else { "bf16" };
            let mut line = format!("gemv {what} {n}x{k} {fmt} rows {nrows}:");
            for name in ["gemv_lp", "gemv_lp_nl4", "gemv_lp_nl8"] {
                let splits: &[i32] = if name == "gemv_lp" {
                    &[1, 2, 4, 8]
                } else {
                    &[1, 2, 4]
                };
                for &split in splits {
                    let at_of = |c: usize| pool.ptr + ((c % copies) * wbytes) as u64;
                    let p = |c: usize| GemvLp {
                        w: Ptr::new(if q8 { 0 } else { at_of(c) }),
                        ldw: k as i64,
                        wq: Ptr::new(if q8 { at_of(c) } else { 0 }),
                        ws: Ptr::new(if q8 { scales.ptr } else { 0 }),
                        x_lp: Ptr::new(x.ptr),
                        x_f32: Ptr::NULL,
                        ldx: k as i64,
                        y: PtrMut::new(y.ptr),
                        ldy: n as i64,
                        n_out: n as i64,
                        k: k as i64,
                        rows: nrows as i64,
                        split,
                        vec: 1,
                        lp_mode: 0,
                    };
                    // SAFETY: the pool holds `copies` weights of n × k; x holds 8 rows of
                    // k ≤ 8192 values; y holds 8 rows of n ≤ 65536.
                    let run = |c: usize| unsafe { gemv_named(&dev, &p(c), name) };
                    run(0)?;
                    let t = median(
                        (0..5)
                            .map(|_| {
                                ev.time(&dev, || {
                                    for c in 0..reps {
                                        run(c).expect("gemv");
                                    }
                                }) / reps as f64
                            })
                            .collect(),
                    );
                    run(0)?;
                    dev.sync()?;
                    let mut out = vec![0f32; nrows * n];
                    y.read(0, &mut out)?;
                    // gemv_lp runs first at every split; the others must give its bits.
                    let same = match refs.iter().find(|r| r.0 == split) {
                        None => {
                            refs.push((split, out));
                            "ref"
                        }
                        Some(r)
                            if r.1
                                .iter()
                                .zip(&out)
                                .all(|(a, b)| a.to_bits() == b.to_bits()) =>
                        {
                            "same bits"
                        }
                        Some(_) => "BITS DIFFER",
                    };
                    line += &format!(
                        "\n    {name} split {split}: {:.2} us, {:.0} GB/s ({:.0} % of the copy), {same}",
                        t * 1e6,
                        wbytes as f64 / t / 1e9,
                        100.0 * wbytes as f64 / t / 1e9 / copy_gbs
                    );
                }
            }
            rows.push(line);
            println!("{}", rows.last().unwrap());
        }
    }
    Ok(())
}

/// Seconds per decode step of `batch` rows: ids drawn on the device, and logits to the host
/// with a host argmax.
fn decode_at(e: &mut GpuEngine, cfg: &MambaConfig, batch: usize) -> reference::Result<(f64, f64)> {
    let v = cfg.vocab_size;
    let held = e
        .hold_state(&State::<f32>::zeros(cfg, batch))?
        .expect("the CUDA engine holds states");
    let prompt = gpu::bench::tokens(64, v, 5);
    let mut first = vec![0f32; v];
    for row in 0..batch {
        e.prefill_held_row(held, row, &prompt[..1 + row % 64], &mut first)?;
    }
    let how = vec![reference::RowSampling::greedy(v as u32); batch];
    let mut ids = gpu::bench::tokens(batch, v, 3);
    let mut feed = ids.clone();
    let steps = if batch >= 64 { 16 } else { 48 };
    for _ in 0..4 {
        e.step_held_sample(held, &feed.clone(), &how, &mut ids)?;
        feed.copy_from_slice(&ids);
    }
    let t0 = Instant::now();
    for _ in 0..steps {
        e.step_held_sample(held, &feed.clone(), &how, &mut ids)?;
        feed.copy_from_slice(&ids);
    }
    let td = t0.elapsed().as_secs_f64() / steps as f64;
    let mut logits = vec![0f32; batch * v];
    let argmax = |l: &[f32]| {
        l.iter()
            .enumerate()
            .fold((0, f32::MIN), |a, (i, &x)| if x > a.1 { (i, x) } else { a })
            .0 as u32
    };
    for _ in 0..2 {
        e.step_held(held, &feed, None, &mut logits)?;
    }
    let t0 = Instant::now();
    for _ in 0..steps {
        e.step_held(held, &feed, None, &mut logits)?;
        for (b, f) in feed.iter_mut().enumerate() {
            *f = argmax(&logits[b * v..(b + 1) * v]);
        }
    }
    Ok((td, t0.elapsed().as_secs_f64() / steps as f64))
}

/// What to measure.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum What {
    Scan,
    Infer,
    Train,
    All,
    Profile,
    /// The 1.4B at 2 × 8192 and 1 × 16384.
    TrainLong,
    /// The decode projections' GEMV kernels alone, against a device copy.
    Gemv,
    /// Per-launch device times of decode steps (`VET_INFER_SIZES`, `VET_INFER_BATCHES`).
    DecodeProfile,
    /// Per-launch device times of a 2048-token prefill (`VET_INFER_SIZES`).
    PrefillProfile,
    /// The scan forward in one segment against the planned segments (batch-1 prefill, long
    /// sequences).
    ScanSegs,
}

/// GPU benchmarks: the scan kernels, inference (prefill, decode) and training steps.
#[derive(clap::Parser)]
struct Args {
    #[arg(value_enum, default_value_t = What::All)]
    what: What,
    /// Added by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let what = <Args as clap::Parser>::parse().what;
    if let Err(e) = gpu::available() {
        eprintln!("gpu-bench: {e}");
        std::process::exit(2);
    }
    let mut rows = Vec::new();
    let r = (|| {
        if what == What::Scan || what == What::All {
            scan(&mut rows)?;
        }
        if what == What::PrefillProfile {
            prefill_profile(&mut rows)?;
        }
        if what == What::ScanSegs {
            scan_segs(&mut rows)?;
        }
        if what == What::Infer || what == What::All {
            infer(&mut rows)?;
        }
        if what == What::Train || what == What::All {
            train(&mut rows, &TRAIN)?;
        }
        if what == What::TrainLong {
            train(&mut rows, &TRAIN_LONG)?;
        }
        if what == What::Profile {
            profile(&mut rows)?;
        }
        if what == What::Gemv {
            gemv_bench(&mut rows)?;
        }
        if what == What::DecodeProfile {
            decode_profile(&mut rows)?;
        }
        Ok::<(), reference::Error>(())
    })();
    println!("\n== summary ==");
    for r in &rows {
        println!("{r}");
    }
    if let Err(e) = r {
        eprintln!("gpu-bench: {e}");
        std::process::exit(1);
    }
}
