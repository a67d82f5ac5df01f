//! AdamW (`reference::optim`) in every tier: the reference's own contracts (the decay set,
//! the first step, clipping and the skipped non-finite step), then the simd twin
//! (`simd::optim::adamw_step`) against the reference on 1 and 2 threads.

use conformance::shape::{base, Shape};
use conformance::tol::SIMD_ADAMW_F32;
use conformance::{assert_close, diff, pool, random_params, SmallModel};
use reference::optim::{grad_norm, AdamW, StepStats};
use reference::params::is_no_decay;
use reference::rng::Rng;
use reference::{param_specs, AdamWConfig, MambaConfig, NormKind, Params};

fn adamw_case(seed: u64) -> (MambaConfig, Params<f32>) {
    let m = SmallModel {
        norm: NormKind::Layer,
        bias: true,
        tied: false,
        ..SmallModel::default()
    };
    let cfg = m.config();
    let p = random_params::<f32>(&cfg, seed);
    (cfg, p)
}

#[test]
fn reference_adamw_decays_only_the_decay_set() {
    // With zero gradients the moments stay zero, so the only change is the decoupled decay.
    let (cfg, p0) = adamw_case(7);
    let mut p = p0.clone();
    let mut g = Params::zeros(&cfg);
    let mut opt = AdamW::new(&cfg);
    let hp = AdamWConfig {
        weight_decay: 0.1,
        max_grad_norm: None,
        ..AdamWConfig::default()
    };
    let lr = 0.5;
    opt.step(&cfg, &mut p, &mut g, &hp, lr);
    let decay = (1.0 - lr * hp.weight_decay) as f32;
    for (((name, _), before), after) in param_specs(&cfg).iter().zip(p0.tensors()).zip(p.tensors())
    {
        for (b, a) in before.data.iter().zip(&after.data) {
            let want = if is_no_decay(name) { *b } else { *b * decay };
            assert_eq!(a.to_bits(), want.to_bits(), "{name}: {b} became {a}");
        }
    }
    assert!(param_specs(&cfg)
        .iter()
        .any(|(n, _)| n.ends_with("A_log") && is_no_decay(n)));
    assert!(!is_no_decay("backbone.layers.0.mixer.in_proj.weight"));
}

#[test]
fn reference_adamw_first_step_moves_each_weight_by_lr_against_its_gradient_sign() {
    // Step 1 with no decay: m̂ = g, v̂ = g², so the update is lr · g / (|g| + eps) ≈ lr · sign(g).
    let (cfg, p0) = adamw_case(8);
    let mut p = p0.clone();
    let mut g: Params<f32> = random_params(&cfg, 9);
    let g0 = g.clone();
    let mut opt = AdamW::new(&cfg);
    let hp = AdamWConfig {
        weight_decay: 0.0,
        max_grad_norm: None,
        ..AdamWConfig::default()
    };
    opt.step(&cfg, &mut p, &mut g, &hp, 1e-2);
    for ((b, a), gt) in p0.tensors().iter().zip(p.tensors()).zip(g0.tensors()) {
        for ((bv, av), gv) in b.data.iter().zip(&a.data).zip(&gt.data) {
            let want = bv - 1e-2 * gv.signum();
            assert!((av - want).abs() < 1e-5, "{bv} -> {av}, gradient {gv}");
        }
    }
    assert_eq!(opt.step, 1);
}

#[test]
fn reference_clipping_scales_the_global_norm_down_to_the_limit_and_nan_skips_the_step() {
    let (cfg, p0) = adamw_case(10);
    let mut p = p0.clone();
    let mut g: Params<f32> = random_params(&cfg, 11);
    let before = grad_norm(&g);
    assert!(before > 1.0);
    let mut opt = AdamW::new(&cfg);
    let st = opt.step(&cfg, &mut p, &mut g, &AdamWConfig::default(), 1e-3);
    assert!(st.clipped && !st.skipped);
    assert!((st.grad_norm - before).abs() < 1e-9);
    assert!(
        (grad_norm(&g) - 1.0).abs() < 1e-5,
        "clipped norm {}",
        grad_norm(&g)
    );
    // A NaN gradient: nothing moves and the step count stays.
    let mut q = p.clone();
    g.layers[0].d.data[0] = f32::NAN;
    let st = opt.step(&cfg, &mut q, &mut g, &AdamWConfig::default(), 1e-3);
    assert!(st.skipped);
    assert_eq!(q, p);
    assert_eq!(opt.step, 1);
}

/// Random parameters, gradients of scale `g_scale` and moments after `steps` earlier steps.
fn adam_inputs(name: &str, g_scale: f64) -> (MambaConfig, Params<f32>, Params<f32>, AdamW<f32>) {
    let s = Shape {
        norm: NormKind::Layer,
        tied: false,
        bias: true,
        ..base()
    };
    let cfg = s.config();
    let seed = conformance::seed_of(name);
    let params = random_params::<f32>(&cfg, seed);
    let mut rng = Rng::new(seed ^ 1);
    let mut grads = Params::<f32>::zeros(&cfg);
    for t in grads.tensors_mut() {
        t.data
            .iter_mut()
            .for_each(|v| *v = (g_scale * rng.normal()) as f32);
    }
    let mut opt = AdamW::<f32>::new(&cfg);
    for t in opt.m.tensors_mut() {
        t.data
            .iter_mut()
            .for_each(|v| *v = (0.01 * rng.normal()) as f32);
    }
    for t in opt.v.tensors_mut() {
        t.data
            .iter_mut()
            .for_each(|v| *v = (1e-4 * rng.normal().abs()) as f32);
    }
    opt.step = 3;
    (cfg, params, grads, opt)
}

fn check_adamw(name: &str, g_scale: f64, hp: &AdamWConfig, expect_clip: bool) -> f64 {
    let (cfg, params, grads, opt) = adam_inputs(name, g_scale);
    let (mut pw, mut gw, mut ow) = (params.clone(), grads.clone(), opt.clone());
    let sw = ow.step(&cfg, &mut pw, &mut gw, hp, 3e-3);
    let mut worst = 0.0f64;
    for t in [1, 2] {
        let (mut pg, mut gg, mut og) = (params.clone(), grads.clone(), opt.clone());
        let sg: StepStats =
            simd::optim::adamw_step(&pool(t), &cfg, &mut og, &mut pg, &mut gg, hp, 3e-3);
        assert_eq!((sg.clipped, sg.skipped), (sw.clipped, sw.skipped), "{name}");
        assert_eq!(sg.clipped, expect_clip, "{name}: clipping");
        assert!(
            (sg.grad_norm - sw.grad_norm).abs() <= 1e-12 * sw.grad_norm,
            "{name}: grad norm {} vs {}",
            sg.grad_norm,
            sw.grad_norm
        );
        assert_eq!(og.step, ow.step, "{name}: step count");
        for (what, g, w) in [
            ("params", &pg, &pw),
            ("m", &og.m, &ow.m),
            ("v", &og.v, &ow.v),
            ("clipped grads", &gg, &gw),
        ] {
            for (((pname, shape), a), b) in
                param_specs(&cfg).iter().zip(g.tensors()).zip(w.tensors())
            {
                worst = worst.max(diff(&a.data, &b.data).rel);
                assert_close(
                    &format!("{name}: {what} {pname}"),
                    shape,
                    &a.data,
                    &b.data,
                    SIMD_ADAMW_F32,
                );
            }
        }
    }
    println!("{name}: worst relative error {worst:.3e}");
    worst
}

#[test]
fn simd_adamw_step_matches_reference() {
    let hp = AdamWConfig::default();
    check_adamw("adamw_clipped", 1.0, &hp, true);
    check_adamw("adamw_unclipped", 1e-3, &hp, false);
    let no_clip = AdamWConfig {
        max_grad_norm: None,
        weight_decay: 0.0,
        ..hp.clone()
    };
    check_adamw("adamw_no_clip_no_decay", 1.0, &no_clip, false);
}

#[test]
fn simd_adamw_skips_a_non_finite_gradient() {
    let (cfg, params, mut grads, opt) = adam_inputs("adamw_nan", 1.0);
    grads.layers[0].d.data[1] = f32::NAN;
    let (mut p, mut o) = (params.clone(), opt.clone());
    let s = simd::optim::adamw_step(
        &pool(2),
        &cfg,
        &mut o,
        &mut p,
        &mut grads,
        &AdamWConfig::default(),
        1e-3,
    );
    assert!(s.skipped && !s.clipped && !s.grad_norm.is_finite());
    assert_eq!(p, params);
    assert_eq!(o, opt);
}
