//! `DecodeState` on an engine that holds states (a stand-in for the GPU: the reference behind
//! the `hold_state` calls, counting the copies) and on one that does not: the same logits and
//! state bit for bit as stepping a host `State`, the state copied off the engine only when
//! asked (and once), stale tickets refused, and the defaults of engines that hold nothing.

use reference::engine::NamedTensors;
use reference::init::init_params;
use reference::model::Batch;
use reference::rng::Rng;
use reference::{
    DecodeState, HeldState, InferenceEngine, MambaConfig, ReferenceEngine, Result, State, Tensor,
};

/// The reference, plus one held state in "device" memory.
struct Holding {
    inner: ReferenceEngine<f32>,
    held: Option<(HeldState, State<f32>)>,
    next: u64,
    /// Copies of a whole state into or out of the engine.
    copies: usize,
}

impl Holding {
    fn slot(&mut self, h: HeldState, op: &'static str) -> Result<&mut State<f32>> {
        match &mut self.held {
            Some((t, s)) if *t == h => Ok(s),
            _ => Err(reference::engine::not_held("holding", op, h)),
        }
    }
}

impl InferenceEngine for Holding {
    fn name(&self) -> String {
        "holding".into()
    }
    fn config(&self) -> &MambaConfig {
        self.inner.config()
    }
    fn forward(&mut self, i: &Batch, s: Option<&State<f32>>) -> Result<(Tensor<f32>, State<f32>)> {
        self.inner.forward(i, s)
    }
    fn step(&mut self, t: &[u32], r: Option<&[bool]>, s: &mut State<f32>) -> Result<Tensor<f32>> {
        self.inner.step(t, r, s)
    }
    fn hold_state(&mut self, state: &State<f32>) -> Result<Option<HeldState>> {
        self.next += 1;
        self.copies += 1;
        let t = HeldState {
            id: self.next,
            batch: state.batch(),
        };
        self.held = Some((t, state.clone()));
        Ok(Some(t))
    }
    fn read_held(&mut self, h: HeldState, state: &mut State<f32>) -> Result<()> {
        *state = self.slot(h, "read_held")?.clone();
        self.copies += 1;
        Ok(())
    }
    fn step_held(
        &mut self,
        h: HeldState,
        tokens: &[u32],
        resets: Option<&[bool]>,
        logits: &mut [f32],
    ) -> Result<()> {
        let mut st = self.slot(h, "step_held")?.clone();
        self.inner.step_into(tokens, resets, &mut st, logits)?;
        *self.slot(h, "step_held")? = st;
        Ok(())
    }
    fn prefill_held(&mut self, h: HeldState, tokens: &[u32], logits: &mut [f32]) -> Result<()> {
        let mut st = self.slot(h, "prefill_held")?.clone();
        self.inner.prefill(tokens, &mut st, logits)?;
        *self.slot(h, "prefill_held")? = st;
        Ok(())
    }
    fn parameters(&self) -> Result<NamedTensors> {
        self.inner.parameters()
    }
}

fn model() -> (MambaConfig, ReferenceEngine<f32>) {
    let cfg = MambaConfig::new(24, 2, 37);
    let p = init_params::<f32>(&cfg, 3);
    (cfg.clone(), ReferenceEngine::new(cfg, p))
}

fn random_state(cfg: &MambaConfig, batch: usize, rng: &mut Rng) -> State<f32> {
    let mut s = State::zeros(cfg, batch);
    for v in s.conv.data.iter_mut().chain(s.ssm.data.iter_mut()) {
        *v = rng.normal() as f32;
    }
    s
}

#[test]
fn held_decoding_equals_host_decoding_bit_for_bit() {
    let (cfg, plain) = model();
    let (_, inner) = model();
    let mut holding = Holding {
        inner,
        held: None,
        next: 0,
        copies: 0,
    };
    let mut plain = plain;
    let mut rng = Rng::new(11);
    let v = cfg.vocab_size;
    let start = random_state(&cfg, 1, &mut rng);
    let mut host = DecodeState::new(&mut plain, start.clone()).unwrap();
    let mut held = DecodeState::new(&mut holding, start).unwrap();
    assert!(!host.is_held());
    assert!(held.is_held());
    let (mut a, mut b) = (vec![0f32; v], vec![0f32; v]);
    let prompt: Vec<u32> = (0..9).map(|_| rng.below(v as u64) as u32).collect();
    host.prefill(&mut plain, &prompt, &mut a).unwrap();
    held.prefill(&mut holding, &prompt, &mut b).unwrap();
    assert_eq!(a, b);
    for k in 0..6 {
        let t = [rng.below(v as u64) as u32];
        let resets = [k == 3];
        host.step(&mut plain, &t, Some(&resets), &mut a).unwrap();
        held.step(&mut holding, &t, Some(&resets), &mut b).unwrap();
        assert_eq!(a, b, "step {k}");
    }
    // Nothing crossed since the state went in.
    assert_eq!(holding.copies, 1);
    let want = host.state(&mut plain).unwrap().clone();
    assert_eq!(held.state(&mut holding).unwrap(), &want);
    assert_eq!(holding.copies, 2, "the state is copied out once when asked");
    held.state(&mut holding).unwrap();
    assert_eq!(holding.copies, 2, "an unchanged state is not copied again");
    assert_ne!(want.ssm.data, State::<f32>::zeros(&cfg, 1).ssm.data);
    // Steps after a read: the next read sees them.
    for _ in 0..2 {
        let t = [rng.below(v as u64) as u32];
        host.step(&mut plain, &t, None, &mut a).unwrap();
        held.step(&mut holding, &t, None, &mut b).unwrap();
    }
    let want = host.state(&mut plain).unwrap().clone();
    assert_eq!(held.state(&mut holding).unwrap(), &want);
}

#[test]
fn a_replaced_held_state_is_refused_not_reused() {
    let (cfg, inner) = model();
    let mut e = Holding {
        inner,
        held: None,
        next: 0,
        copies: 0,
    };
    let v = cfg.vocab_size;
    let mut logits = vec![0f32; v];
    let mut first = DecodeState::zeros(&mut e, 1).unwrap();
    first.step(&mut e, &[1], None, &mut logits).unwrap();
    let mut second = DecodeState::zeros(&mut e, 1).unwrap();
    let err = first.step(&mut e, &[1], None, &mut logits).unwrap_err();
    assert!(err.to_string().contains("does not hold state #1"), "{err}");
    second.step(&mut e, &[1], None, &mut logits).unwrap();
    // set() takes a new ticket for the same DecodeState.
    let mut rng = Rng::new(2);
    let s = random_state(&cfg, 1, &mut rng);
    first.set(&mut e, s.clone()).unwrap();
    assert_eq!(first.state(&mut e).unwrap(), &s);
    assert!(second.step(&mut e, &[1], None, &mut logits).is_err());
}

#[test]
fn engines_that_hold_nothing_say_so() {
    let (cfg, mut e) = model();
    let s = State::zeros(&cfg, 2);
    assert_eq!(e.hold_state(&s).unwrap(), None);
    let ticket = HeldState { id: 1, batch: 2 };
    let mut logits = vec![0f32; 2 * cfg.vocab_size];
    assert!(e.step_held(ticket, &[0, 1], None, &mut logits).is_err());
    assert!(e
        .prefill_held(ticket, &[0], &mut logits[..cfg.vocab_size])
        .is_err());
    let mut out = State::zeros(&cfg, 2);
    assert!(e.read_held(ticket, &mut out).is_err());
    assert!(e.memory().unwrap().is_none());
}
