//! The reference behind the two engine traits: the forward-only loss is the training loss bit
//! for bit and leaves the gradients alone; per-layer gradients and the optimizer step over a
//! slice of the parameters (for sharded training) agree with their whole-model twins.

use approx::assert_relative_eq;
use conformance::{random_flags, random_params, random_state, random_tokens, SmallModel};
use reference::loss::next_token_targets;
use reference::model::Batch;
use reference::rng::Rng;
use reference::{
    param_specs, AdamWConfig, Float, InferenceEngine, MambaConfig, NormKind, ReferenceEngine,
    TrainingEngine,
};

fn model() -> MambaConfig {
    SmallModel {
        d_model: 12,
        n_layer: 3,
        vocab: 41,
        d_state: 5,
        d_conv: 3,
        expand: 2,
        norm: NormKind::Layer,
        tied: false,
        bias: true,
        conv_bias: true,
    }
    .config()
}

/// A random batch `[2, 23]` with resets, next-token targets, a mask with holes and a state.
struct Case {
    inputs: Vec<u32>,
    resets: Vec<bool>,
    targets: Vec<u32>,
    mask: Vec<bool>,
    state: reference::State<f32>,
}

const B: usize = 2;
const L: usize = 23;

fn case(cfg: &MambaConfig, seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let tokens = random_tokens(&mut rng, cfg, B * (L + 1));
    let (targets, mut mask) = next_token_targets(&tokens, B, L + 1);
    let pick = |v: &[u32]| -> Vec<u32> {
        (0..B)
            .flat_map(|r| v[r * (L + 1)..r * (L + 1) + L].to_vec())
            .collect()
    };
    mask.iter_mut()
        .enumerate()
        .for_each(|(i, m)| *m &= i % 5 != 2);
    let mask = (0..B)
        .flat_map(|r| mask[r * (L + 1)..r * (L + 1) + L].to_vec())
        .collect();
    Case {
        inputs: pick(&tokens),
        resets: random_flags(&mut rng, B * L, 0.08),
        targets: pick(&targets),
        mask,
        state: random_state(&mut rng, cfg, B),
    }
}

impl Case {
    fn batch(&self) -> Batch<'_> {
        Batch {
            batch: B,
            seq_len: L,
            tokens: &self.inputs,
            resets: Some(&self.resets),
        }
    }
}

/// The loss without a backward equals `loss_and_backward`'s bit for bit (f32 and f64), with
/// and without mask and state, and leaves earlier gradients exactly as they were.
fn forward_only_loss_is_the_training_loss<T: Float>() {
    let cfg = model();
    let mut e = ReferenceEngine::<T>::new(cfg.clone(), random_params(&cfg, 31));
    let warm = case(&cfg, 5);
    e.loss_and_backward(&warm.batch(), &warm.targets, None, None, 0.7)
        .unwrap();
    let grads = e.gradients().unwrap();
    assert!(grads.iter().any(|(_, t)| t.data.iter().any(|&g| g != 0.0)));
    let c = case(&cfg, 6);
    for (mask, state) in [
        (None, None),
        (Some(&c.mask[..]), None),
        (Some(&c.mask[..]), Some(&c.state)),
    ] {
        let eval = e.loss(&c.batch(), &c.targets, mask, state).unwrap();
        assert_eq!(
            e.gradients().unwrap(),
            grads,
            "{}: loss moved the gradients",
            e.name()
        );
        let mut twin = e.clone();
        let lo = twin
            .loss_and_backward(&c.batch(), &c.targets, mask, state, 1.0)
            .unwrap();
        assert_eq!(eval.loss.to_bits(), lo.loss.to_bits(), "{}", e.name());
        assert_eq!(eval.n_targets, lo.n_targets);
        assert!(eval.loss > 0.5 * (cfg.vocab_size as f64).ln());
    }
}

#[test]
fn forward_only_loss_is_the_training_loss_bit_for_bit_f32() {
    forward_only_loss_is_the_training_loss::<f32>();
}

#[test]
fn forward_only_loss_is_the_training_loss_bit_for_bit_f64() {
    forward_only_loss_is_the_training_loss::<f64>();
}

/// The default `InferenceEngine::loss` (forward + host cross-entropy in f32) agrees with the
/// reference's own loss to f32 rounding.
#[test]
fn default_forward_only_loss_agrees_with_the_reference_loss() {
    struct Plain(ReferenceEngine<f64>);
    impl InferenceEngine for Plain {
        fn name(&self) -> String {
            "plain".into()
        }
        fn config(&self) -> &MambaConfig {
            self.0.config()
        }
        fn forward(
            &mut self,
            i: &Batch,
            s: Option<&reference::State<f32>>,
        ) -> reference::Result<(reference::Tensor<f32>, reference::State<f32>)> {
            self.0.forward(i, s)
        }
        fn step(
            &mut self,
            t: &[u32],
            r: Option<&[bool]>,
            s: &mut reference::State<f32>,
        ) -> reference::Result<reference::Tensor<f32>> {
            self.0.step(t, r, s)
        }
        fn parameters(&self) -> reference::Result<reference::engine::NamedTensors> {
            self.0.parameters()
        }
    }
    let cfg = model();
    let mut plain = Plain(ReferenceEngine::new(cfg.clone(), random_params(&cfg, 8)));
    let c = case(&cfg, 9);
    let got = plain
        .loss(&c.batch(), &c.targets, Some(&c.mask), Some(&c.state))
        .unwrap();
    let want = plain
        .0
        .loss(&c.batch(), &c.targets, Some(&c.mask), Some(&c.state))
        .unwrap();
    assert_eq!(got.n_targets, want.n_targets);
    assert_relative_eq!(got.loss, want.loss, max_relative = 1e-6);
}

/// Each layer's gradients are exactly that layer's slice of `gradients()`, in order.
#[test]
fn gradients_of_a_layer_are_its_slice_of_every_gradient() {
    let cfg = model();
    let mut e = ReferenceEngine::<f32>::new(cfg.clone(), random_params(&cfg, 12));
    let c = case(&cfg, 13);
    e.loss_and_backward(&c.batch(), &c.targets, Some(&c.mask), Some(&c.state), 1.0)
        .unwrap();
    let all = e.gradients().unwrap();
    let mut seen = 0;
    for layer in 0..cfg.n_layer {
        let got = e.gradients_of_layer(layer).unwrap();
        let prefix = format!("backbone.layers.{layer}.");
        let want: Vec<_> = all
            .iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .cloned()
            .collect();
        assert!(!got.is_empty());
        assert_eq!(got, want, "layer {layer}");
        seen += got.len();
    }
    // Embedding, final norm (weight and bias) and the untied head are outside every layer.
    assert_eq!(seen + 4, all.len());
    let err = e.gradients_of_layer(cfg.n_layer).unwrap_err().to_string();
    assert!(err.contains("layer 3 of a model with 3 layers"), "{err}");
}

/// Two "ranks" each step their half of the parameters with the global norm (clipping on):
/// together they give `optimizer_step`'s parameters and moments bit for bit, and a rank
/// leaves the other half untouched.
#[test]
fn optimizer_steps_over_two_halves_equal_one_whole_step() {
    let cfg = model();
    let mut whole = ReferenceEngine::<f32>::new(cfg.clone(), random_params(&cfg, 21));
    let c = case(&cfg, 22);
    whole
        .loss_and_backward(&c.batch(), &c.targets, Some(&c.mask), Some(&c.state), 40.0)
        .unwrap();
    let hp = AdamWConfig {
        max_grad_norm: Some(0.5),
        ..AdamWConfig::default()
    };
    let (mut r0, mut r1) = (whole.clone(), whole.clone());
    let norm = whole.grad_norm();
    let n = param_specs(&cfg).len();
    let cut = n / 2;
    let before = whole.parameters().unwrap();
    let s0 = r0.optimizer_step_range(&hp, 3e-3, 0..cut, norm).unwrap();
    let s1 = r1.optimizer_step_range(&hp, 3e-3, cut..n, norm).unwrap();
    let stats = whole.optimizer_step(&hp, 3e-3).unwrap();
    assert!(stats.clipped && s0.clipped && s1.clipped);
    assert_relative_eq!(s0.grad_norm, stats.grad_norm);
    let (p0, p1, pw) = (
        r0.parameters().unwrap(),
        r1.parameters().unwrap(),
        whole.parameters().unwrap(),
    );
    assert_eq!(&p0[..cut], &pw[..cut]);
    assert_eq!(&p1[cut..], &pw[cut..]);
    assert_eq!(&p0[cut..], &before[cut..], "rank 0 touched rank 1's half");
    assert_eq!(&p1[..cut], &before[..cut], "rank 1 touched rank 0's half");
    let (o0, o1, ow) = (
        r0.optimizer_state().unwrap(),
        r1.optimizer_state().unwrap(),
        whole.optimizer_state().unwrap(),
    );
    assert_eq!((o0.step, o1.step), (ow.step, ow.step));
    assert_eq!(&o0.m[..cut], &ow.m[..cut]);
    assert_eq!(&o1.v[cut..], &ow.v[cut..]);
    let err = r0
        .optimizer_step_range(&hp, 3e-3, 0..n + 1, norm)
        .unwrap_err()
        .to_string();
    assert!(err.contains("optimizer_step_range"), "{err}");
}
