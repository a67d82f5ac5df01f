//! The CUDA tier (`gpu`) against the reference, on the device: logits, final state, loss,
//! every gradient, the initial-state gradient, an AdamW step, decode steps and prefill, for
//! random models with odd sizes, partial scan chunks, resets, a loss mask and an initial
//! state; f32, bf16 and fp16; and two runs giving identical bits.
//!
//! Without a CUDA device every test prints a `skipping` line and passes. On the device:
//! `bash scripts/gpu-tests.sh run` (builds here with `bash scripts/gpu-tests.sh`).

use conformance::{
    diff, random_flags, random_params, random_state, random_tokens, seed_of, SmallModel,
};
use reference::model::Batch;
use reference::rng::Rng;
use reference::{
    AdamWConfig, DecodeState, InferenceEngine, NormKind, ReferenceEngine, State, TrainingEngine,
};

use conformance::tol::gpu as tol;

#[derive(Clone, Copy)]
struct Tols {
    fwd: f64,
    loss: f64,
    grad: f64,
    adam: f64,
}

const F32: Tols = Tols {
    fwd: tol::F32_FWD,
    loss: tol::F32_LOSS,
    grad: tol::F32_GRAD,
    adam: tol::F32_ADAM,
};
const BF16: Tols = Tols {
    fwd: tol::BF16_FWD,
    loss: tol::BF16_LOSS,
    grad: tol::BF16_GRAD,
    adam: f64::INFINITY,
};
const FP16: Tols = Tols {
    fwd: tol::FP16_FWD,
    loss: tol::FP16_LOSS,
    grad: tol::FP16_GRAD,
    adam: f64::INFINITY,
};

/// The CUDA engine, or `None` (after a `skipping` line) without a device.
fn gpu(
    test: &str,
    cfg: &reference::MambaConfig,
    p: reference::Params<f32>,
    precision: gpu::Precision,
) -> Option<Box<dyn TrainingEngine>> {
    if let Err(e) = gpu::available() {
        println!("skipping {test}: {e}");
        return None;
    }
    let o = gpu::GpuOptions {
        ordinal: 0,
        precision,
    };
    Some(gpu::engine(cfg, p, &o).unwrap_or_else(|e| panic!("{test}: {e}")))
}

/// A case: a model shape and the input features it exercises.
struct Case {
    name: &'static str,
    model: SmallModel,
    batch: usize,
    seq_len: usize,
    resets: bool,
    mask: bool,
    state: bool,
}

fn m(d_model: usize, n_layer: usize, vocab: usize, d_state: usize, d_conv: usize) -> SmallModel {
    SmallModel {
        d_model,
        n_layer,
        vocab,
        d_state,
        d_conv,
        ..SmallModel::default()
    }
}

fn cases() -> Vec<Case> {
    let c = |name, model, batch, seq_len, resets, mask, state| Case {
        name,
        model,
        batch,
        seq_len,
        resets,
        mask,
        state,
    };
    vec![
        // (name, model, batch, seq_len, resets, mask, state)
        c("tiny_odd", m(6, 2, 11, 3, 4), 2, 7, false, false, false),
        c(
            "decode_like_1tok",
            m(8, 2, 13, 4, 4),
            3,
            1,
            false,
            false,
            true,
        ),
        // seq_len 130 = four full scan chunks of 32 and a partial one
        c(
            "partial_chunk",
            m(16, 2, 37, 16, 4),
            2,
            130,
            false,
            false,
            false,
        ),
        // d_inner 34 (not a multiple of the channels per block), d_state 7 (padded to 8)
        c(
            "odd_lanes_resets_mask_state",
            m(17, 2, 29, 7, 4),
            3,
            67,
            true,
            true,
            true,
        ),
        c(
            "layernorm_bias_untied_dconv3",
            SmallModel {
                norm: NormKind::Layer,
                tied: false,
                bias: true,
                conv_bias: false,
                ..m(12, 3, 23, 5, 3)
            },
            2,
            65,
            true,
            true,
            true,
        ),
        c(
            "mamba_like_d64_state16",
            m(64, 2, 301, 16, 4),
            2,
            200,
            true,
            true,
            false,
        ),
    ]
}

/// One comparison: name, relative error, limit.
struct Row(String, f64, f64, bool);

fn cmp(rows: &mut Vec<Row>, what: String, got: &[f32], want: &[f64], limit: f64) {
    let d = diff(got, want);
    rows.push(Row(what, d.rel, limit, d.has_nan));
}

fn report(test: &str, rows: &[Row]) {
    println!("{test}: {:<70} {:>11} {:>9}", "what", "rel err", "limit");
    let mut bad = Vec::new();
    for Row(w, e, l, nan) in rows {
        let ok = !nan && e <= l;
        println!(
            "  {:<76} {:>11.3e} {:>9.1e} {}",
            w,
            e,
            l,
            if ok { "" } else { "FAIL" }
        );
        if !ok {
            bad.push(w.clone());
        }
    }
    assert!(bad.is_empty(), "{test}: over the limit: {bad:?}");
}

struct Inputs {
    tokens: Vec<u32>,
    resets: Option<Vec<bool>>,
    targets: Vec<u32>,
    mask: Option<Vec<bool>>,
    state: Option<State<f32>>,
}

fn inputs(case: &Case, cfg: &reference::MambaConfig) -> Inputs {
    let mut rng = Rng::new(seed_of(case.name) ^ 0x1234);
    let n = case.batch * case.seq_len;
    Inputs {
        tokens: random_tokens(&mut rng, cfg, n),
        resets: case.resets.then(|| random_flags(&mut rng, n, 0.05)),
        targets: random_tokens(&mut rng, cfg, n),
        mask: case.mask.then(|| random_flags(&mut rng, n, 0.8)),
        state: case.state.then(|| random_state(&mut rng, cfg, case.batch)),
    }
}

/// Runs every comparison of `case` at `precision` into `rows`.
fn check_case(
    test: &str,
    case: &Case,
    precision: gpu::Precision,
    t: Tols,
    rows: &mut Vec<Row>,
) -> bool {
    let cfg = case.model.config();
    let p32 = random_params::<f32>(&cfg, seed_of(case.name));
    let Some(mut g) = gpu(test, &cfg, p32.clone(), precision) else {
        return false;
    };
    let mut r = ReferenceEngine::<f64>::new(cfg.clone(), p32.cast(&cfg));
    let inp = inputs(case, &cfg);
    let batch = Batch {
        batch: case.batch,
        seq_len: case.seq_len,
        tokens: &inp.tokens,
        resets: inp.resets.as_deref(),
    };
    let g = g.as_mut();
    check_forward(g, &mut r, &batch, &inp, case.name, t, rows);
    check_training(g, &mut r, &batch, &inp, case, precision, t, rows);
    check_adamw(g, &mut r, case.name, t, rows);
    let mut rng = Rng::new(seed_of(case.name) ^ 0xdec0de);
    let toks = &inp.tokens[..case.seq_len];
    check_decode(g, &mut r, &mut rng, case, toks, t, rows);
    check_held(g, &mut r, &mut rng, case, toks, t, rows);
    true
}

/// f32 values as f64, to compare with the f64 reference.
fn f(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Logits and the final state of a forward.
fn check_forward(
    g: &mut dyn TrainingEngine,
    r: &mut ReferenceEngine<f64>,
    batch: &Batch,
    inp: &Inputs,
    name: &str,
    t: Tols,
    rows: &mut Vec<Row>,
) {
    // forward
    let (gl, gs) = g.forward(batch, inp.state.as_ref()).unwrap();
    let (rl, rs) = r.forward(batch, inp.state.as_ref()).unwrap();
    let rl64: Vec<f64> = rl.data.iter().map(|&v| v as f64).collect();
    // The f64 reference returns f32 through the Engine API; that rounding (≤ 6e-8) is far
    // below every limit.
    cmp(rows, format!("{name}: logits"), &gl.data, &rl64, t.fwd);
    cmp(
        rows,
        format!("{name}: final conv state"),
        &gs.conv.data,
        &f(&rs.conv.data),
        t.fwd,
    );
    cmp(
        rows,
        format!("{name}: final ssm state"),
        &gs.ssm.data,
        &f(&rs.ssm.data),
        t.fwd,
    );
}

/// Loss, every gradient and the initial state's gradient.
#[allow(clippy::too_many_arguments)]
fn check_training(
    g: &mut dyn TrainingEngine,
    r: &mut ReferenceEngine<f64>,
    batch: &Batch,
    inp: &Inputs,
    case: &Case,
    precision: gpu::Precision,
    t: Tols,
    rows: &mut Vec<Row>,
) {
    let name = case.name;
    // loss + backward (grad_scale 0.5 checks the scaling; fp16 mode reads grad_scale as the
    // loss scale and divides it out in the optimizer step, so it gets 1)
    let gscale = if precision == gpu::Precision::Fp16 {
        1.0
    } else {
        0.5
    };
    let lg = g
        .loss_and_backward(
            batch,
            &inp.targets,
            inp.mask.as_deref(),
            inp.state.as_ref(),
            gscale,
        )
        .unwrap();
    let lr = r
        .loss_and_backward(
            batch,
            &inp.targets,
            inp.mask.as_deref(),
            inp.state.as_ref(),
            gscale,
        )
        .unwrap();
    cmp(
        rows,
        format!("{name}: loss"),
        &[lg.loss as f32],
        &[lr.loss],
        t.loss,
    );
    assert_eq!(lg.n_targets, lr.n_targets, "{name}: n_targets");
    for ((gn, gt), (rn, rt)) in g
        .gradients()
        .unwrap()
        .iter()
        .zip(r.gradients().unwrap().iter())
    {
        assert_eq!(gn, rn);
        cmp(
            rows,
            format!("{name}: grad {gn}"),
            &gt.data,
            &f(&rt.data),
            t.grad,
        );
    }
    if case.state {
        cmp(
            rows,
            format!("{name}: grad initial conv"),
            &lg.grad_state.conv.data,
            &f(&lr.grad_state.conv.data),
            t.grad,
        );
        cmp(
            rows,
            format!("{name}: grad initial ssm"),
            &lg.grad_state.ssm.data,
            &f(&lr.grad_state.ssm.data),
            t.grad,
        );
    }
}

/// One AdamW step with clipping (max norm 0.1 is below these gradients' norms): the norm,
/// the step's stats, and (f32) the parameters and the first moment after it.
fn check_adamw(
    g: &mut dyn TrainingEngine,
    r: &mut ReferenceEngine<f64>,
    name: &str,
    t: Tols,
    rows: &mut Vec<Row>,
) {
    // AdamW step (clipping on: max norm 0.1 is below these gradients' norms)
    let hp = AdamWConfig {
        max_grad_norm: Some(0.1),
        ..AdamWConfig::default()
    };
    let sg = g.optimizer_step(&hp, 1e-3).unwrap();
    let sr = r.optimizer_step(&hp, 1e-3).unwrap();
    cmp(
        rows,
        format!("{name}: grad norm"),
        &[sg.grad_norm as f32],
        &[sr.grad_norm],
        t.grad,
    );
    assert_eq!(
        (sg.clipped, sg.skipped),
        (sr.clipped, sr.skipped),
        "{name}: step stats"
    );
    if t.adam.is_finite() {
        let gp: Vec<f32> = g
            .parameters()
            .unwrap()
            .iter()
            .flat_map(|(_, t)| t.data.clone())
            .collect();
        let rp: Vec<f64> = r
            .parameters()
            .unwrap()
            .iter()
            .flat_map(|(_, t)| f(&t.data))
            .collect();
        cmp(
            rows,
            format!("{name}: parameters after AdamW"),
            &gp,
            &rp,
            t.adam,
        );
        let om = g.optimizer_state().unwrap();
        let rm = r.optimizer_state().unwrap();
        assert_eq!(om.step, rm.step);
        let gm: Vec<f32> = om.m.iter().flat_map(|(_, t)| t.data.clone()).collect();
        let rmv: Vec<f64> = rm.m.iter().flat_map(|(_, t)| f(&t.data)).collect();
        cmp(rows, format!("{name}: AdamW m"), &gm, &rmv, t.grad);
    }
}

/// Decode steps from a random state (one row reset on the second step), and prefill of row 0.
#[allow(clippy::too_many_arguments)]
fn check_decode(
    g: &mut dyn TrainingEngine,
    r: &mut ReferenceEngine<f64>,
    rng: &mut Rng,
    case: &Case,
    toks: &[u32],
    t: Tols,
    rows: &mut Vec<Row>,
) {
    let (name, cfg) = (case.name, case.model.config());
    // decode steps from a random state, one row reset on the second step
    let mut s_g: State<f32> = random_state(rng, &cfg, case.batch);
    let mut s_r = s_g.clone();
    let mut logits = vec![0f32; case.batch * cfg.vocab_size];
    for k in 0..3 {
        let toks = random_tokens(rng, &cfg, case.batch);
        let resets: Vec<bool> = (0..case.batch).map(|b| k == 1 && b == 0).collect();
        g.step_into(&toks, Some(&resets), &mut s_g, &mut logits)
            .unwrap();
        let want = r.step(&toks, Some(&resets), &mut s_r).unwrap();
        cmp(
            rows,
            format!("{name}: decode step {k} logits"),
            &logits,
            &f(&want.data),
            t.fwd,
        );
        cmp(
            rows,
            format!("{name}: decode step {k} ssm state"),
            &s_g.ssm.data,
            &f(&s_r.ssm.data),
            t.fwd,
        );
    }
    // prefill of row 0 from a random state
    let mut s_g: State<f32> = random_state(rng, &cfg, 1);
    let mut s_r = s_g.clone();
    let mut lg1 = vec![0f32; cfg.vocab_size];
    let mut lr1 = vec![0f32; cfg.vocab_size];
    g.prefill(toks, &mut s_g, &mut lg1).unwrap();
    r.prefill(toks, &mut s_r, &mut lr1).unwrap();
    cmp(
        rows,
        format!("{name}: prefill logits"),
        &lg1,
        &f(&lr1),
        t.fwd,
    );
    cmp(
        rows,
        format!("{name}: prefill conv state"),
        &s_g.conv.data,
        &f(&s_r.conv.data),
        t.fwd,
    );
}

/// A state held in device memory, against the reference and the host-state path.
#[allow(clippy::too_many_arguments)]
fn check_held(
    g: &mut dyn TrainingEngine,
    r: &mut ReferenceEngine<f64>,
    rng: &mut Rng,
    case: &Case,
    toks: &[u32],
    t: Tols,
    rows: &mut Vec<Row>,
) {
    let (name, cfg) = (case.name, case.model.config());
    let mut logits = vec![0f32; case.batch * cfg.vocab_size];
    let mut lg1 = vec![0f32; cfg.vocab_size];
    let mut lr1 = vec![0f32; cfg.vocab_size];
    // A state held in device memory: steps with a reset against the reference and against
    // the host-state path of the same engine (same kernels: the same bits), then read back.
    let st0: State<f32> = random_state(rng, &cfg, case.batch);
    let mut held = DecodeState::new(&mut *g, st0.clone()).unwrap();
    assert!(
        held.is_held(),
        "{name}: the CUDA engine holds decode states"
    );
    let (mut s_r, mut s_h) = (st0.clone(), st0);
    let mut host_logits = vec![0f32; case.batch * cfg.vocab_size];
    for k in 0..3 {
        let toks = random_tokens(rng, &cfg, case.batch);
        let resets: Vec<bool> = (0..case.batch)
            .map(|b| k == 2 && b == case.batch - 1)
            .collect();
        held.step(&mut *g, &toks, Some(&resets), &mut logits)
            .unwrap();
        g.step_into(&toks, Some(&resets), &mut s_h, &mut host_logits)
            .unwrap();
        assert!(
            logits
                .iter()
                .zip(&host_logits)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}: held-state step {k} differs from the host-state step"
        );
        let want = r.step(&toks, Some(&resets), &mut s_r).unwrap();
        cmp(
            rows,
            format!("{name}: held decode step {k} logits"),
            &logits,
            &f(&want.data),
            t.fwd,
        );
    }
    let got = held.state(&mut *g).unwrap().clone();
    assert_eq!(
        got, s_h,
        "{name}: held state read back differs from the host path"
    );
    cmp(
        rows,
        format!("{name}: held decode ssm state"),
        &got.ssm.data,
        &f(&s_r.ssm.data),
        t.fwd,
    );
    cmp(
        rows,
        format!("{name}: held decode conv state"),
        &got.conv.data,
        &f(&s_r.conv.data),
        t.fwd,
    );
    // Prefill then steps of one sequence on a held state; the first ticket is now stale.
    let mut one = DecodeState::zeros(&mut *g, 1).unwrap();
    let stale = held.step(&mut *g, &vec![0; case.batch], None, &mut logits);
    assert!(
        stale.is_err(),
        "{name}: a replaced held state still stepped"
    );
    let mut s_r = State::zeros(&cfg, 1);
    one.prefill(&mut *g, toks, &mut lg1).unwrap();
    r.prefill(toks, &mut s_r, &mut lr1).unwrap();
    cmp(
        rows,
        format!("{name}: held prefill logits"),
        &lg1,
        &f(&lr1),
        t.fwd,
    );
    for k in 0..2 {
        let tk = random_tokens(rng, &cfg, 1);
        one.step(&mut *g, &tk, None, &mut lg1).unwrap();
        let want = r.step(&tk, None, &mut s_r).unwrap();
        cmp(
            rows,
            format!("{name}: held step {k} after prefill logits"),
            &lg1,
            &f(&want.data),
            t.fwd,
        );
    }
    let got = one.state(&mut *g).unwrap();
    cmp(
        rows,
        format!("{name}: held prefill+steps ssm state"),
        &got.ssm.data,
        &f(&s_r.ssm.data),
        t.fwd,
    );
}

fn check_all(test: &str, precision: gpu::Precision, t: Tols, only: Option<&[&str]>) {
    let mut rows = Vec::new();
    for case in cases() {
        if only.is_some_and(|o| !o.contains(&case.name)) {
            continue;
        }
        if !check_case(test, &case, precision, t, &mut rows) {
            return;
        }
    }
    report(test, &rows);
}

#[test]
fn gpu_f32_model_matches_reference() {
    check_all(
        "gpu_f32_model_matches_reference",
        gpu::Precision::F32,
        F32,
        None,
    );
}

#[test]
fn gpu_bf16_model_matches_reference() {
    check_all(
        "gpu_bf16_model_matches_reference",
        gpu::Precision::Bf16,
        BF16,
        None,
    );
}

#[test]
fn gpu_fp16_model_matches_reference() {
    let only: &[&str] = &[
        "partial_chunk",
        "odd_lanes_resets_mask_state",
        "mamba_like_d64_state16",
    ];
    check_all(
        "gpu_fp16_model_matches_reference",
        gpu::Precision::Fp16,
        FP16,
        Some(only),
    );
}

/// Loss, gradients and parameters after a step, bit for bit, from two fresh engines.
fn run_twice_bits(precision: gpu::Precision) -> Option<(Vec<u32>, Vec<u32>)> {
    let case = &cases()[5];
    let cfg = case.model.config();
    let p = random_params::<f32>(&cfg, seed_of("determinism"));
    let inp = inputs(case, &cfg);
    let batch = Batch {
        batch: case.batch,
        seq_len: case.seq_len,
        tokens: &inp.tokens,
        resets: inp.resets.as_deref(),
    };
    let mut out = Vec::new();
    for _ in 0..2 {
        let mut g = gpu(
            "gpu_two_runs_give_identical_bits",
            &cfg,
            p.clone(),
            precision,
        )?;
        let mut bits = Vec::new();
        for _ in 0..2 {
            g.zero_grad().unwrap();
            let lo = g
                .loss_and_backward(&batch, &inp.targets, inp.mask.as_deref(), None, 1.0)
                .unwrap();
            bits.push((lo.loss as f32).to_bits());
            for (_, t) in g.gradients().unwrap() {
                bits.extend(t.data.iter().map(|v| v.to_bits()));
            }
            g.optimizer_step(&AdamWConfig::default(), 1e-3).unwrap();
        }
        for (_, t) in g.parameters().unwrap() {
            bits.extend(t.data.iter().map(|v| v.to_bits()));
        }
        out.push(bits);
    }
    let b = out.pop()?;
    let a = out.pop()?;
    Some((a, b))
}

#[test]
fn gpu_two_runs_give_identical_bits() {
    for precision in [gpu::Precision::F32, gpu::Precision::Bf16] {
        let Some((a, b)) = run_twice_bits(precision) else {
            return;
        };
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        println!(
            "gpu_two_runs_give_identical_bits {precision:?}: {} values, {differing} differ",
            a.len()
        );
        assert_eq!(differing, 0, "{precision:?}: runs differ");
    }
}

#[test]
fn gpu_engine_without_cuda_is_an_error_not_a_panic() {
    let cfg = SmallModel::default().config();
    let p = random_params::<f32>(&cfg, 1);
    let r = gpu::engine(&cfg, p, &gpu::GpuOptions::default());
    match gpu::available() {
        Err(e) => {
            let err = r.err().expect("no CUDA: engine must fail");
            println!("no CUDA here ({e}); engine says: {err}");
            assert!(matches!(err, reference::Error::Device { .. }));
        }
        Ok(()) => assert!(
            r.is_ok(),
            "CUDA available but the engine failed: {:?}",
            r.err()
        ),
    }
}

/// At the 1.4B model's layer width (d_model 2048, d_inner 4096) and sequence 2048 (64 scan
/// chunks): changing the token at position 1500 of row 0 leaves every logit before it, and
/// all of row 1, bit for bit the same, and changes the logits at 1500 and just after (the
/// conv window). A kernel that read past its position (a leak of the targets into the
/// inputs) fails here.
#[test]
fn gpu_logits_are_causal_at_full_width() {
    let mut cfg = reference::MambaConfig::new(2048, 2, 4096);
    cfg.vocab_size = 4096;
    let p = conformance::random_params::<f32>(&cfg, 41);
    let Some(mut g) = gpu(
        "gpu_logits_are_causal_at_full_width",
        &cfg,
        p,
        gpu::Precision::Bf16,
    ) else {
        return;
    };
    let (batch, seq, v) = (2, 2048, cfg.vocab_size);
    let mut rng = Rng::new(5);
    let mut toks = random_tokens(&mut rng, &cfg, batch * seq);
    let (a, _) = g.forward(&Batch::new(&toks, batch, seq), None).unwrap();
    let at = 1500;
    toks[at] = (toks[at] + 1) % v as u32;
    let (b, _) = g.forward(&Batch::new(&toks, batch, seq), None).unwrap();
    let same = |lo: usize, hi: usize| {
        a.data[lo * v..hi * v]
            .iter()
            .zip(&b.data[lo * v..hi * v])
            .all(|(x, y)| x.to_bits() == y.to_bits())
    };
    assert!(same(0, at), "a logit before the changed token moved");
    assert!(same(seq, 2 * seq), "the other row moved");
    for t in [at, at + 1, at + 3] {
        assert!(!same(t, t + 1), "position {t} ignored the changed token");
    }
}
