//! Decoding with the recurrent state kept where the engine computes.
//!
//! A CPU engine steps a [`State`] in host memory. A GPU engine would copy that state to the
//! device and back on every token (15 MB each way for a 1.4B model), so engines may *hold* a
//! state themselves ([`Engine::hold_state`]): a step then moves only the tokens in and the
//! logits out. [`DecodeState`] hides the difference: it holds the state on the engine when the
//! engine offers it, keeps it in host memory otherwise, and hands the host copy out on demand.

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::state::State;

/// A ticket for a state an engine holds (see [`Engine::hold_state`]). An engine holds one
/// state at a time: holding another invalidates earlier tickets, and using a stale ticket is
/// an error, never a silent use of someone else's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldState {
    /// Unique per engine and per call to [`Engine::hold_state`].
    pub id: u64,
    /// Rows of the held state.
    pub batch: usize,
}

/// The error for a ticket an engine does not (or no longer) recognise.
pub fn not_held(engine: &str, op: &'static str, held: HeldState) -> Error {
    Error::Shape {
        op,
        msg: format!(
            "{engine} does not hold state #{} any more (another state was moved onto it since)",
            held.id
        ),
    }
}

/// A decode state on the engine (when it can hold one) or in host memory.
#[derive(Debug)]
pub struct DecodeState {
    host: State<f32>,
    held: Option<HeldState>,
    /// The engine's copy is newer than `host`.
    host_stale: bool,
}

impl DecodeState {
    /// `state` as the starting point of decoding on `engine` (moved onto it when it holds
    /// states).
    pub fn new<E: Engine + ?Sized>(engine: &mut E, state: State<f32>) -> Result<DecodeState> {
        state.check(engine.config(), state.batch(), "DecodeState::new")?;
        let held = engine.hold_state(&state)?;
        Ok(DecodeState {
            host: state,
            held,
            host_stale: false,
        })
    }

    /// The all-zero state of `batch` rows.
    pub fn zeros<E: Engine + ?Sized>(engine: &mut E, batch: usize) -> Result<DecodeState> {
        let st = State::zeros(engine.config(), batch);
        DecodeState::new(engine, st)
    }

    /// Whether the engine holds this state (decode steps then move no state).
    pub fn is_held(&self) -> bool {
        self.held.is_some()
    }

    pub fn batch(&self) -> usize {
        self.host.batch()
    }

    /// Replaces the state with `state` (e.g. zeros to start a new conversation).
    pub fn set<E: Engine + ?Sized>(&mut self, engine: &mut E, state: State<f32>) -> Result<()> {
        *self = DecodeState::new(engine, state)?;
        Ok(())
    }

    /// [`Engine::prefill`] from this state (batch 1).
    pub fn prefill<E: Engine + ?Sized>(
        &mut self,
        engine: &mut E,
        tokens: &[u32],
        logits: &mut [f32],
    ) -> Result<()> {
        match self.held {
            Some(h) => {
                engine.prefill_held(h, tokens, logits)?;
                self.host_stale = true;
                Ok(())
            }
            None => engine.prefill(tokens, &mut self.host, logits),
        }
    }

    /// [`Engine::step_into`] from this state.
    pub fn step<E: Engine + ?Sized>(
        &mut self,
        engine: &mut E,
        tokens: &[u32],
        resets: Option<&[bool]>,
        logits: &mut [f32],
    ) -> Result<()> {
        match self.held {
            Some(h) => {
                engine.step_held(h, tokens, resets, logits)?;
                self.host_stale = true;
                Ok(())
            }
            None => engine.step_into(tokens, resets, &mut self.host, logits),
        }
    }

    /// The current state in host memory (copied off the engine if it moved since).
    pub fn state<E: Engine + ?Sized>(&mut self, engine: &mut E) -> Result<&State<f32>> {
        if let (Some(h), true) = (self.held, self.host_stale) {
            engine.read_held(h, &mut self.host)?;
            self.host_stale = false;
        }
        Ok(&self.host)
    }
}
