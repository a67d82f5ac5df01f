//! Decoding with the recurrent state kept where the engine computes.
//!
//! A CPU engine steps a [`State`] in host memory. A GPU engine would copy that state to the
//! device and back on every token (15 MB each way for a 1.4B model), so engines may *hold* a
//! state themselves ([`InferenceEngine::hold_state`]): a step then moves only the tokens in and the
//! logits out. [`DecodeState`] hides the difference: it holds the state on the engine when the
//! engine offers it, keeps it in host memory otherwise, and hands the host copy out on demand.

use crate::engine::InferenceEngine;
use crate::error::Result;
// Re-exported where they used to live: they belong to the engine interface.
pub use crate::engine::{not_held, HeldState};
use crate::state::State;

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
    pub fn new<E: InferenceEngine + ?Sized>(
        engine: &mut E,
        state: State<f32>,
    ) -> Result<DecodeState> {
        state.check(engine.config(), state.batch(), "DecodeState::new")?;
        let held = engine.hold_state(&state)?;
        Ok(DecodeState {
            host: state,
            held,
            host_stale: false,
        })
    }

    /// The all-zero state of `batch` rows.
    pub fn zeros<E: InferenceEngine + ?Sized>(engine: &mut E, batch: usize) -> Result<DecodeState> {
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
    pub fn set<E: InferenceEngine + ?Sized>(
        &mut self,
        engine: &mut E,
        state: State<f32>,
    ) -> Result<()> {
        *self = DecodeState::new(engine, state)?;
        Ok(())
    }

    /// [`InferenceEngine::prefill`] from this state (batch 1).
    pub fn prefill<E: InferenceEngine + ?Sized>(
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

    /// [`InferenceEngine::step_into`] from this state.
    pub fn step<E: InferenceEngine + ?Sized>(
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
    pub fn state<E: InferenceEngine + ?Sized>(&mut self, engine: &mut E) -> Result<&State<f32>> {
        if let (Some(h), true) = (self.held, self.host_stale) {
            engine.read_held(h, &mut self.host)?;
            self.host_stale = false;
        }
        Ok(&self.host)
    }
}
