//! Every gradient of the reference (f64) against central differences, on small random models:
//! both norms, tied and untied heads, biases on and off, d_conv 2 to 4, with resets, a loss mask
//! and an initial state.

use conformance::tol::{FD_STEP, GRAD_FD_F64, GRAD_FD_F64_FLOOR};
use conformance::{
    assert_close_floor, random_flags, random_params, random_state, random_tokens, seed_of,
    SmallModel,
};
use reference::loss::{cross_entropy, next_token_targets};
use reference::model::{backward, forward, Batch};
use reference::rng::Rng;
use reference::{MambaConfig, NormKind, Params, State};

struct Case {
    cfg: MambaConfig,
    tokens: Vec<u32>,
    resets: Option<Vec<bool>>,
    targets: Vec<u32>,
    mask: Vec<bool>,
    state: Option<State<f64>>,
    batch: usize,
    seq_len: usize,
}

impl Case {
    fn batch(&self) -> Batch<'_> {
        Batch {
            batch: self.batch,
            seq_len: self.seq_len,
            tokens: &self.tokens,
            resets: self.resets.as_deref(),
        }
    }

    fn loss(&self, p: &Params<f64>, state: Option<&State<f64>>) -> f64 {
        let (logits, _, _) = forward(&self.cfg, p, &self.batch(), state, false).unwrap();
        cross_entropy(
            &logits.data,
            &self.targets,
            Some(&self.mask),
            self.cfg.vocab_size,
            1.0,
        )
        .unwrap()
        .loss
    }

    fn analytic(&self, p: &Params<f64>) -> (Params<f64>, State<f64>) {
        let (logits, _, cache) =
            forward(&self.cfg, p, &self.batch(), self.state.as_ref(), true).unwrap();
        let lo = cross_entropy(
            &logits.data,
            &self.targets,
            Some(&self.mask),
            self.cfg.vocab_size,
            1.0,
        )
        .unwrap();
        let mut grads = Params::zeros(&self.cfg);
        let gs = backward(
            &self.cfg,
            p,
            &self.batch(),
            self.state.as_ref(),
            &cache.unwrap(),
            &lo.d_logits,
            &mut grads,
        )
        .unwrap();
        (grads, gs)
    }
}

fn make_case(
    name: &str,
    m: SmallModel,
    resets: bool,
    mask: bool,
    state: bool,
) -> (Case, Params<f64>) {
    let cfg = m.config();
    let mut rng = Rng::new(seed_of(name));
    let (batch, seq_len) = (2, 7);
    let n = batch * seq_len;
    let tokens = random_tokens(&mut rng, &cfg, n);
    let (targets, mut tmask) = next_token_targets(&tokens, batch, seq_len);
    if mask {
        let keep = random_flags(&mut rng, n, 0.6);
        for (m, k) in tmask.iter_mut().zip(keep) {
            *m &= k;
        }
    }
    let resets = resets.then(|| {
        let mut r = random_flags(&mut rng, n, 0.25);
        r[3] = true; // at least one reset mid-row
        r
    });
    let state = state.then(|| random_state(&mut rng, &cfg, batch));
    let params = random_params(&cfg, seed_of(name));
    let case = Case {
        cfg,
        tokens,
        resets,
        targets,
        mask: tmask,
        state,
        batch,
        seq_len,
    };
    (case, params)
}

/// Compares every parameter gradient and the state gradient with central differences; returns
/// the worst relative error seen.
fn check(name: &str, m: SmallModel, resets: bool, mask: bool, state: bool) -> f64 {
    let (case, params) = make_case(name, m, resets, mask, state);
    let (grads, grad_state) = case.analytic(&params);
    let mut worst = 0.0f64;
    let specs = reference::param_specs(&case.cfg);
    for (k, (pname, shape)) in specs.iter().enumerate() {
        let n = grads.tensors()[k].numel();
        let mut fd = vec![0.0; n];
        for (i, slot) in fd.iter_mut().enumerate() {
            let mut p = params.clone();
            p.tensors_mut()[k].data[i] += FD_STEP;
            let up = case.loss(&p, case.state.as_ref());
            p.tensors_mut()[k].data[i] -= 2.0 * FD_STEP;
            let down = case.loss(&p, case.state.as_ref());
            *slot = (up - down) / (2.0 * FD_STEP);
        }
        let got = &grads.tensors()[k].data;
        worst = worst.max(conformance::diff(got, &fd).rel);
        assert_close_floor(
            &format!("{name}: grad {pname}"),
            shape,
            got,
            &fd,
            GRAD_FD_F64,
            GRAD_FD_F64_FLOOR,
        );
    }
    if let Some(s0) = &case.state {
        for (which, got) in [("conv", &grad_state.conv), ("ssm", &grad_state.ssm)] {
            let mut fd = vec![0.0; got.numel()];
            for (i, slot) in fd.iter_mut().enumerate() {
                let mut s = s0.clone();
                let t = if which == "conv" {
                    &mut s.conv
                } else {
                    &mut s.ssm
                };
                t.data[i] += FD_STEP;
                let up = case.loss(&params, Some(&s));
                let t = if which == "conv" {
                    &mut s.conv
                } else {
                    &mut s.ssm
                };
                t.data[i] -= 2.0 * FD_STEP;
                let down = case.loss(&params, Some(&s));
                *slot = (up - down) / (2.0 * FD_STEP);
            }
            worst = worst.max(conformance::diff(&got.data, &fd).rel);
            assert_close_floor(
                &format!("{name}: grad initial {which} state"),
                &got.shape,
                &got.data,
                &fd,
                GRAD_FD_F64,
                GRAD_FD_F64_FLOOR,
            );
        }
    }
    println!("{name}: worst relative error {worst:.3e}");
    worst
}

fn model(norm: NormKind, tied: bool, bias: bool, conv_bias: bool, d_conv: usize) -> SmallModel {
    SmallModel {
        norm,
        tied,
        bias,
        conv_bias,
        d_conv,
        ..SmallModel::default()
    }
}

#[test]
fn rmsnorm_tied_plain_matches_central_differences() {
    check(
        "rms_tied_plain",
        model(NormKind::Rms, true, false, true, 4),
        false,
        false,
        false,
    );
}

#[test]
fn layernorm_untied_with_biases_resets_mask_and_state_matches_central_differences() {
    check(
        "ln_untied_bias_all",
        model(NormKind::Layer, false, true, true, 4),
        true,
        true,
        true,
    );
}

#[test]
fn rmsnorm_untied_no_conv_bias_dconv2_with_resets_matches_central_differences() {
    check(
        "rms_untied_dconv2_resets",
        model(NormKind::Rms, false, false, false, 2),
        true,
        false,
        true,
    );
}

#[test]
fn layernorm_tied_dconv3_with_mask_matches_central_differences() {
    check(
        "ln_tied_dconv3_mask",
        model(NormKind::Layer, true, false, true, 3),
        false,
        true,
        false,
    );
}

#[test]
fn rmsnorm_tied_bias_dconv3_with_state_and_resets_matches_central_differences() {
    let m = SmallModel {
        d_model: 5,
        d_state: 4,
        expand: 3,
        ..model(NormKind::Rms, true, true, true, 3)
    };
    check("rms_odd_widths_state_resets", m, true, true, true);
}
