//! Stateful training over consecutive windows (`[train] carry_state = k`): back-propagating
//! through `k` windows with `TrainingEngine::loss_and_backward_carry` (each window's final-state
//! gradient handed to the window before it) gives the loss and gradients of one forward over
//! the whole stream. Checked on the reference in f64 against itself, on the simd tier against
//! the reference, and on the CUDA tier (skipped without a device) against the f64 reference.

use conformance::tol::gpu::F32_LOSS as GPU_F32_LOSS;
use conformance::tol::gpu::{CARRY_STATE_F32 as GPU_CARRY_STATE_F32, F32_GRAD as GPU_F32_GRAD};
use conformance::tol::{CARRY_WINDOWS_F64, SIMD_BACKWARD_F32, SIMD_BACKWARD_STATE_F32};
use conformance::{
    assert_close, random_flags, random_params, random_state, random_tokens, seed_of, SmallModel,
};
use reference::loss::cross_entropy;
use reference::model::Batch;
use reference::model::{backward_final, forward};
use reference::rng::Rng;
use reference::{MambaConfig, Params, ReferenceEngine, State, TrainingEngine};
use simd::{SimdEngine, SimdOptions};

/// One stream case: `batch` rows of `windows * window` tokens, resets, targets, an initial state.
struct Stream {
    batch: usize,
    window: usize,
    windows: usize,
    tokens: Vec<u32>,
    targets: Vec<u32>,
    resets: Vec<bool>,
    init: State<f32>,
}

impl Stream {
    fn new(
        name: &str,
        cfg: &MambaConfig,
        batch: usize,
        window: usize,
        windows: usize,
        p_reset: f64,
    ) -> Stream {
        let mut rng = Rng::new(seed_of(name));
        let n = batch * window * windows;
        let mut resets = random_flags(&mut rng, n, p_reset);
        // Row 1 starts its 2nd window with a document (the carried state must be zeroed there).
        if batch > 1 && windows > 1 {
            resets[window * windows + window] = true;
        }
        Stream {
            batch,
            window,
            windows,
            tokens: random_tokens(&mut rng, cfg, n),
            targets: random_tokens(&mut rng, cfg, n),
            resets,
            init: random_state(&mut rng, cfg, batch),
        }
    }

    /// Window `j` of every row: (tokens, targets, resets), `[batch, window]` each.
    fn window(&self, j: usize) -> (Vec<u32>, Vec<u32>, Vec<bool>) {
        let (l, total) = (self.window, self.window * self.windows);
        let mut out = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..self.batch {
            let s = r * total + j * l..r * total + (j + 1) * l;
            out.0.extend_from_slice(&self.tokens[s.clone()]);
            out.1.extend_from_slice(&self.targets[s.clone()]);
            out.2.extend_from_slice(&self.resets[s]);
        }
        out
    }
}

/// Loss, gradients and initial-state gradient of one forward over the whole stream.
fn whole(e: &mut dyn TrainingEngine, s: &Stream) -> (f64, Vec<Vec<f32>>, State<f32>) {
    e.zero_grad().unwrap();
    let input = Batch {
        batch: s.batch,
        seq_len: s.window * s.windows,
        tokens: &s.tokens,
        resets: Some(&s.resets),
    };
    let lo = e
        .loss_and_backward(&input, &s.targets, None, Some(&s.init), 1.0)
        .unwrap();
    let g = e
        .gradients()
        .unwrap()
        .into_iter()
        .map(|(_, t)| t.data)
        .collect();
    (lo.loss, g, lo.grad_state)
}

/// The same through `k = windows` windows: forward-only pass for the states
/// (`TrainingEngine::forward_state`, as the trainer runs it), then backward
/// from the last window to the first, each with `1 / windows` of the scale (equal windows, so
/// the mean of the window means is the stream's mean).
fn carried(e: &mut dyn TrainingEngine, s: &Stream) -> (f64, Vec<Vec<f32>>, State<f32>) {
    e.zero_grad().unwrap();
    let wins: Vec<_> = (0..s.windows).map(|j| s.window(j)).collect();
    let batch = |w: &(Vec<u32>, Vec<u32>, Vec<bool>)| -> (Vec<u32>, Vec<bool>) {
        (w.0.clone(), w.2.clone())
    };
    let mut states = vec![s.init.clone()];
    for w in &wins[..s.windows - 1] {
        let (tok, res) = batch(w);
        let input = Batch {
            batch: s.batch,
            seq_len: s.window,
            tokens: &tok,
            resets: Some(&res),
        };
        let next = e.forward_state(&input, states.last()).unwrap();
        states.push(next);
    }
    let (mut grad, mut loss) = (None, 0.0);
    for j in (0..s.windows).rev() {
        let (tok, res) = batch(&wins[j]);
        let input = Batch {
            batch: s.batch,
            seq_len: s.window,
            tokens: &tok,
            resets: Some(&res),
        };
        let scale = 1.0 / s.windows as f64;
        let (lo, _) = e
            .loss_and_backward_carry(
                &input,
                &wins[j].1,
                None,
                Some(&states[j]),
                grad.as_ref(),
                scale,
            )
            .unwrap();
        loss += lo.loss / s.windows as f64;
        grad = Some(lo.grad_state);
    }
    let g = e
        .gradients()
        .unwrap()
        .into_iter()
        .map(|(_, t)| t.data)
        .collect();
    (loss, g, grad.unwrap())
}

/// Loss, gradients and initial-state gradient in f64 on the reference's model functions
/// (the engine's boundary is f32, which would round the states handed between windows): one
/// forward over the whole stream when `windows` is `None`, else window by window, forward-only
/// for the states, then backward from the last window with each final-state gradient passed
/// to the window before.
fn reference_f64(
    cfg: &MambaConfig,
    params: &Params<f64>,
    s: &Stream,
    by_window: bool,
) -> (f64, Params<f64>, State<f64>) {
    let vocab = cfg.vocab_size;
    let mut grads = Params::<f64>::zeros(cfg);
    let init = s.init.cast::<f64>();
    if !by_window {
        let input = Batch {
            batch: s.batch,
            seq_len: s.window * s.windows,
            tokens: &s.tokens,
            resets: Some(&s.resets),
        };
        let (logits, _, cache) = forward(cfg, params, &input, Some(&init), true).unwrap();
        let lo = cross_entropy(&logits.data, &s.targets, None, vocab, 1.0).unwrap();
        let gs = backward_final(
            cfg,
            params,
            &input,
            Some(&init),
            &cache.unwrap(),
            &lo.d_logits,
            None,
            &mut grads,
        )
        .unwrap();
        return (lo.loss, grads, gs);
    }
    let wins: Vec<_> = (0..s.windows).map(|j| s.window(j)).collect();
    let mut states = vec![init];
    for w in &wins[..s.windows - 1] {
        let input = Batch {
            batch: s.batch,
            seq_len: s.window,
            tokens: &w.0,
            resets: Some(&w.2),
        };
        let (_, next, _) = forward(cfg, params, &input, states.last(), false).unwrap();
        states.push(next);
    }
    let (mut grad, mut loss) = (None::<State<f64>>, 0.0);
    let scale = 1.0 / s.windows as f64;
    for j in (0..s.windows).rev() {
        let w = &wins[j];
        let input = Batch {
            batch: s.batch,
            seq_len: s.window,
            tokens: &w.0,
            resets: Some(&w.2),
        };
        let (logits, _, cache) = forward(cfg, params, &input, Some(&states[j]), true).unwrap();
        let lo = cross_entropy(&logits.data, &w.1, None, vocab, scale).unwrap();
        let gs = backward_final(
            cfg,
            params,
            &input,
            Some(&states[j]),
            &cache.unwrap(),
            &lo.d_logits,
            grad.as_ref(),
            &mut grads,
        )
        .unwrap();
        loss += lo.loss * scale;
        grad = Some(gs);
    }
    (loss, grads, grad.unwrap())
}

fn names(cfg: &MambaConfig) -> Vec<String> {
    reference::param_specs(cfg)
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

/// (name, model, batch, window, windows, reset probability)
fn cases() -> Vec<(&'static str, SmallModel, usize, usize, usize, f64)> {
    let m = SmallModel::default();
    vec![
        ("two_windows", m.clone(), 2, 5, 2, 0.0),
        ("four_windows_resets", m.clone(), 2, 4, 4, 0.1),
        // d_conv 4 with windows of 2: the final conv window reaches back into the window before.
        ("windows_shorter_than_the_conv", m.clone(), 1, 2, 5, 0.0),
        (
            "layernorm_untied",
            SmallModel {
                norm: reference::NormKind::Layer,
                tied: false,
                bias: true,
                ..m
            },
            2,
            6,
            3,
            0.05,
        ),
    ]
}

#[test]
fn reference_k_windows_equal_one_forward_over_the_stream() {
    let mut worst = 0f64;
    for (name, m, batch, window, windows, p) in cases() {
        let cfg = m.config();
        let s = Stream::new(name, &cfg, batch, window, windows, p);
        let params = random_params::<f64>(&cfg, seed_of(name));
        let (l1, g1, s1) = reference_f64(&cfg, &params, &s, false);
        let (l2, g2, s2) = reference_f64(&cfg, &params, &s, true);
        let rel = (l1 - l2).abs() / l1.abs();
        assert!(rel <= CARRY_WINDOWS_F64, "{name}: loss {l2} vs {l1}");
        worst = worst.max(rel);
        for ((n, a), b) in names(&cfg).iter().zip(g2.tensors()).zip(g1.tensors()) {
            assert_close(
                &format!("{name} {n}"),
                &a.shape,
                &a.data,
                &b.data,
                CARRY_WINDOWS_F64,
            );
            worst = worst.max(conformance::diff(&a.data, &b.data).rel);
        }
        assert_close(
            &format!("{name} d conv0"),
            &s1.conv.shape,
            &s2.conv.data,
            &s1.conv.data,
            CARRY_WINDOWS_F64,
        );
        assert_close(
            &format!("{name} d ssm0"),
            &s1.ssm.shape,
            &s2.ssm.data,
            &s1.ssm.data,
            CARRY_WINDOWS_F64,
        );
    }
    println!("reference f64, k windows against one forward: worst relative error {worst:.2e}");
}

#[test]
fn detached_windows_do_not_equal_the_stream() {
    // The check above can fail: dropping the final-state gradient (what detach does) changes
    // the gradients well beyond the tolerance.
    let (name, m, batch, window, windows, p) = cases().remove(1);
    let cfg = m.config();
    let s = Stream::new(name, &cfg, batch, window, windows, p);
    let mut e = ReferenceEngine::<f64>::new(cfg.clone(), random_params(&cfg, 3));
    let (_, g1, _) = whole(&mut e, &s);
    e.zero_grad().unwrap();
    let mut st = s.init.clone();
    for j in 0..s.windows {
        let (tok, tgt, res) = s.window(j);
        let input = Batch {
            batch,
            seq_len: window,
            tokens: &tok,
            resets: Some(&res),
        };
        let (_, next) = e
            .loss_and_backward_carry(&input, &tgt, None, Some(&st), None, 1.0 / windows as f64)
            .unwrap();
        st = next;
    }
    let g2: Vec<Vec<f32>> = e
        .gradients()
        .unwrap()
        .into_iter()
        .map(|(_, t)| t.data)
        .collect();
    let worst = g1
        .iter()
        .zip(&g2)
        .map(|(a, b)| conformance::diff(b, a).rel)
        .fold(0.0, f64::max);
    assert!(
        worst > 1e-3,
        "detached gradients differ from the stream's: {worst:e}"
    );
}

#[test]
fn simd_k_windows_match_the_reference() {
    for (name, m, batch, window, windows, p) in cases() {
        let cfg = m.config();
        let params = random_params::<f32>(&cfg, seed_of(name));
        let s = Stream::new(name, &cfg, batch, window, windows, p);
        let mut r = ReferenceEngine::<f32>::new(cfg.clone(), params.clone());
        let mut f = SimdEngine::new(cfg.clone(), params, &SimdOptions::default()).unwrap();
        let (l1, g1, s1) = carried(&mut r, &s);
        let (l2, g2, s2) = carried(&mut f, &s);
        assert!(
            (l1 - l2).abs() <= 1e-5 * l1.abs(),
            "{name}: loss {l2} vs {l1}"
        );
        for ((n, a), b) in names(&cfg).iter().zip(&g2).zip(&g1) {
            assert_close(&format!("{name} {n}"), &[a.len()], a, b, SIMD_BACKWARD_F32);
        }
        assert_close(
            &format!("{name} d ssm0"),
            &s1.ssm.shape,
            &s2.ssm.data,
            &s1.ssm.data,
            SIMD_BACKWARD_STATE_F32,
        );
        assert_close(
            &format!("{name} d conv0"),
            &s1.conv.shape,
            &s2.conv.data,
            &s1.conv.data,
            SIMD_BACKWARD_STATE_F32,
        );
    }
}

/// The CUDA engine in f32, or `None` (after a `skipping` line) without a device.
fn gpu_engine(cfg: &MambaConfig, params: Params<f32>) -> Option<Box<dyn TrainingEngine>> {
    if let Err(e) = gpu::available() {
        println!("skipping gpu_k_windows_equal_one_forward_over_the_stream: {e}");
        return None;
    }
    let o = gpu::GpuOptions {
        ordinal: 0,
        precision: gpu::Precision::F32,
    };
    Some(gpu::engine(cfg, params, &o).expect("the CUDA engine"))
}

/// The CUDA tier's native `loss_and_backward_carry` (final state out, final-state gradient in,
/// on the device) through `k = windows` windows against one f64 reference forward over the
/// whole stream. Detached windows on the same engine must miss it (the check can fail).
#[test]
fn gpu_k_windows_equal_one_forward_over_the_stream() {
    let mut worst = (0f64, 0f64, 0f64);
    for (name, m, batch, window, windows, p) in cases() {
        let cfg = m.config();
        let params = random_params::<f32>(&cfg, seed_of(name));
        let Some(mut g) = gpu_engine(&cfg, params.clone()) else {
            return;
        };
        let s = Stream::new(name, &cfg, batch, window, windows, p);
        let (l1, g1, s1) = reference_f64(&cfg, &params.cast(&cfg), &s, false);
        let (l2, g2, s2) = carried(g.as_mut(), &s);
        let rel = (l1 - l2).abs() / l1.abs();
        worst.0 = worst.0.max(rel);
        assert!(rel <= GPU_F32_LOSS, "{name}: loss {l2} vs {l1}");
        for ((n, a), b) in names(&cfg).iter().zip(&g2).zip(g1.tensors()) {
            worst.1 = worst.1.max(conformance::diff(a, &b.data).rel);
            assert_close(&format!("{name} {n}"), &[a.len()], a, &b.data, GPU_F32_GRAD);
        }
        for (what, a, b) in [("conv", &s2.conv, &s1.conv), ("ssm", &s2.ssm, &s1.ssm)] {
            worst.2 = worst.2.max(conformance::diff(&a.data, &b.data).rel);
            let label = format!("{name} d {what}0");
            assert_close(&label, &a.shape, &a.data, &b.data, GPU_CARRY_STATE_F32);
        }
        // Detached: the same windows without the final-state gradients.
        g.zero_grad().unwrap();
        let mut st = s.init.clone();
        for j in 0..windows {
            let (tok, tgt, res) = s.window(j);
            let input = Batch {
                batch,
                seq_len: window,
                tokens: &tok,
                resets: Some(&res),
            };
            let scale = 1.0 / windows as f64;
            st = g
                .loss_and_backward_carry(&input, &tgt, None, Some(&st), None, scale)
                .unwrap()
                .1;
        }
        let detached = g.gradients().unwrap();
        let miss = detached
            .iter()
            .zip(g1.tensors())
            .map(|((_, a), b)| conformance::diff(&a.data, &b.data).rel)
            .fold(0.0, f64::max);
        assert!(
            miss > 1e-3,
            "{name}: detached windows match the stream ({miss:e})"
        );
    }
    println!(
        "cuda f32, k windows against one f64 forward: worst loss {:.2e}, gradients {:.2e}, \
         initial-state gradient {:.2e}",
        worst.0, worst.1, worst.2
    );
}
