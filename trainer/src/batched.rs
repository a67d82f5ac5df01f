//! Continuous batching: many independent sequences generated together through any
//! [`InferenceEngine`], one batched decode step for all of them, so the engine reads its
//! weights once per step for the whole batch.
//!
//! A [`Batcher`] has `slots` rows, each its own sequence. [`Batcher::admit`] prefills a new
//! sequence into a free row (from the zero state) while the others are mid-answer, and a
//! sequence that stops frees its row for the next one. On an engine that holds states (the
//! GPU), the rows live in device memory ([`InferenceEngine::prefill_held_row`]) and, with
//! [`Batcher::sample_on_device`], each row's next token is drawn there
//! ([`InferenceEngine::step_held_sample`]): only one id per row crosses to the host per step.
//! Otherwise the rows are one host [`State`] stepped with [`InferenceEngine::step_into`] and
//! every row draws with its own [`Sampler`].
//!
//! Each sequence stops as a lone [`crate::generate::Generator::run`] would (its stop token,
//! its token limit, or the caller's callback), and with host sampling (or greedy decoding on
//! the device) it draws the same tokens as a lone run (`tests/batched.rs`). Device draws at a
//! temperature use their own random stream, seeded per sequence: the same seed gives the same
//! answer on the device, not the host sampler's.

use std::ops::ControlFlow;

use anyhow::{bail, Context, Result};
use reference::{HeldState, InferenceEngine, RowSampling, State};

use crate::generate::{Sampler, Stop};

/// One sequence in a row.
struct Slot {
    id: usize,
    sampler: Sampler,
    /// The token drawn and not yet handed to the caller.
    next: u32,
    /// Tokens handed to the caller so far.
    drawn: usize,
}

/// Where the rows' states live.
enum Rows {
    Held(HeldState),
    Host(State<f32>),
}

/// Generates many sequences together, admitting new ones as others finish.
pub struct Batcher {
    slots: Vec<Option<Slot>>,
    rows: Rows,
    vocab: usize,
    /// `[slots, vocab]`: each row's logits (host sampling) or its prefill logits.
    logits: Vec<f32>,
    feed: Vec<u32>,
    ids: Vec<u32>,
    how: Vec<RowSampling>,
    on_device: bool,
}

impl Batcher {
    /// A batcher of `slots` rows on `engine` (held there when the engine holds states).
    pub fn new(engine: &mut dyn InferenceEngine, slots: usize) -> Result<Batcher> {
        if slots == 0 {
            bail!("a batch needs at least one row (--batch 0?)");
        }
        let cfg = engine.config().clone();
        let zeros = State::zeros(&cfg, slots);
        let rows = match engine
            .hold_state(&zeros)
            .context("holding the batch's states")?
        {
            Some(h) => Rows::Held(h),
            None => Rows::Host(zeros),
        };
        let v = cfg.vocab_size;
        Ok(Batcher {
            slots: (0..slots).map(|_| None).collect(),
            rows,
            vocab: v,
            logits: vec![0.0; slots * v],
            feed: vec![0; slots],
            ids: vec![0; slots],
            how: vec![RowSampling::greedy(v as u32); slots],
            on_device: false,
        })
    }

    /// Draws on the device where the engine can (one id per row crosses to the host).
    pub fn sample_on_device(mut self, yes: bool) -> Batcher {
        self.on_device = yes;
        self
    }

    /// Rows in all.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Rows with a sequence in them.
    pub fn active(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    pub fn has_free(&self) -> bool {
        self.active() < self.capacity()
    }

    /// Starts sequence `id` (`prompt`, at least one token) in a free row: prefills it and
    /// draws its first token with `sampler` (whose penalty context gets the prompt).
    pub fn admit(
        &mut self,
        engine: &mut dyn InferenceEngine,
        id: usize,
        prompt: &[u32],
        mut sampler: Sampler,
    ) -> Result<()> {
        if prompt.is_empty() {
            bail!("sequence {id}: the prompt is empty: give at least one token");
        }
        let Some(row) = self.slots.iter().position(|s| s.is_none()) else {
            bail!("sequence {id}: every row of the batch is busy");
        };
        let v = self.vocab;
        let logits = &mut self.logits[row * v..(row + 1) * v];
        match &mut self.rows {
            Rows::Held(h) => {
                let name = engine.name();
                engine
                    .prefill_held_row(*h, row, prompt, logits)
                    .with_context(|| format!("prefilling sequence {id}"))?
                    .with_context(|| {
                        format!("{name} holds states but cannot prefill one row of them")
                    })?;
            }
            Rows::Host(state) => {
                let cfg = engine.config().clone();
                let mut one = State::zeros(&cfg, 1);
                engine
                    .prefill(prompt, &mut one, logits)
                    .with_context(|| format!("prefilling sequence {id}"))?;
                put_row(state, &one, row);
            }
        }
        sampler.observe(prompt);
        let next = sampler.sample(logits)?;
        self.slots[row] = Some(Slot {
            id,
            sampler,
            next,
            drawn: 0,
        });
        Ok(())
    }

    /// Hands every row's drawn token to `on_token(id, token)`, frees the rows that stop
    /// (returned with why, in row order), then runs one decode step for the others and draws
    /// their next tokens. `on_token` may stop its sequence ([`Stop::Caller`]).
    pub fn step(
        &mut self,
        engine: &mut dyn InferenceEngine,
        mut on_token: impl FnMut(usize, u32) -> ControlFlow<()>,
    ) -> Result<Vec<(usize, Stop)>> {
        let mut done = Vec::new();
        let mut live = false;
        for (row, slot) in self.slots.iter_mut().enumerate() {
            let Some(s) = slot else {
                continue;
            };
            if s.sampler.sampling().max_new_tokens == 0 {
                done.push((s.id, Stop::MaxTokens));
                *slot = None;
                continue;
            }
            let t = s.next;
            s.drawn += 1;
            let asked = on_token(s.id, t).is_break();
            let sm = s.sampler.sampling();
            let stop = if Some(t) == sm.stop_token {
                Some(Stop::Token)
            } else if asked {
                Some(Stop::Caller)
            } else if s.drawn >= sm.max_new_tokens {
                Some(Stop::MaxTokens)
            } else {
                None
            };
            self.feed[row] = t;
            if let Some(why) = stop {
                done.push((s.id, why));
                *slot = None;
            } else {
                live = true;
            }
        }
        if live {
            self.decode(engine).context("decoding the batch")?;
        }
        Ok(done)
    }

    /// One decode step of `feed` (free rows ride along; their state is replaced on admit)
    /// and each live row's next token.
    fn decode(&mut self, engine: &mut dyn InferenceEngine) -> Result<()> {
        let v = self.vocab;
        if let (Rows::Held(h), true) = (&self.rows, self.on_device) {
            for (row, slot) in self.slots.iter().enumerate() {
                self.how[row] = match slot {
                    Some(s) => s.sampler.row_sampling(s.drawn as u64),
                    None => RowSampling::greedy(v as u32),
                };
            }
            let ran = engine.step_held_sample(*h, &self.feed, &self.how, &mut self.ids)?;
            if ran.is_some() {
                for (slot, &t) in self.slots.iter_mut().zip(&self.ids) {
                    if let Some(s) = slot {
                        s.next = t;
                        s.sampler.observe(&[t]);
                    }
                }
                return Ok(());
            }
            self.on_device = false;
        }
        match &mut self.rows {
            Rows::Held(h) => engine.step_held(*h, &self.feed, None, &mut self.logits)?,
            Rows::Host(state) => engine.step_into(&self.feed, None, state, &mut self.logits)?,
        }
        for (row, slot) in self.slots.iter_mut().enumerate() {
            if let Some(s) = slot {
                s.next = s.sampler.sample(&mut self.logits[row * v..(row + 1) * v])?;
            }
        }
        Ok(())
    }
}

/// Copies the batch-1 state `one` into row `row` of `state`.
fn put_row(state: &mut State<f32>, one: &State<f32>, row: usize) {
    for (dst, src) in [(&mut state.conv, &one.conv), (&mut state.ssm, &one.ssm)] {
        let (layers, batch) = (dst.shape[0], dst.shape[1]);
        let per = src.data.len() / layers;
        for i in 0..layers {
            let at = (i * batch + row) * per;
            dst.data[at..at + per].copy_from_slice(&src.data[i * per..(i + 1) * per]);
        }
    }
}

/// Generates after every prompt of `prompts` with `slots` rows, sequence `i` drawing with
/// `samplers[i]`; returns each sequence's new tokens (its stop token included) and why it
/// stopped, in order. `on_token(i, token)` sees every token as it is drawn and may stop its
/// sequence.
pub fn generate_batched(
    engine: &mut dyn InferenceEngine,
    prompts: &[Vec<u32>],
    samplers: Vec<Sampler>,
    slots: usize,
    on_device: bool,
    mut on_token: impl FnMut(usize, u32) -> ControlFlow<()>,
) -> Result<Vec<(Vec<u32>, Stop)>> {
    if samplers.len() != prompts.len() {
        bail!("{} samplers for {} prompts", samplers.len(), prompts.len());
    }
    let mut b = Batcher::new(engine, slots.min(prompts.len()).max(1))?.sample_on_device(on_device);
    let mut out: Vec<(Vec<u32>, Option<Stop>)> =
        prompts.iter().map(|_| (Vec::new(), None)).collect();
    let mut waiting = prompts.iter().zip(samplers).enumerate();
    loop {
        while b.has_free() {
            let Some((i, (p, sampler))) = waiting.next() else {
                break;
            };
            b.admit(engine, i, p, sampler)?;
        }
        if b.active() == 0 {
            break;
        }
        let done = b.step(engine, |i, t| {
            out[i].0.push(t);
            on_token(i, t)
        })?;
        for (i, why) in done {
            out[i].1 = Some(why);
        }
    }
    Ok(out
        .into_iter()
        .map(|(t, why)| (t, why.unwrap_or(Stop::MaxTokens)))
        .collect())
}
