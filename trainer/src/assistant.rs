//! The API for apps: load a checkpoint, ask questions, stream the answer, cancel it, and keep
//! the conversation in the model's recurrent state.
//!
//! ```no_run
//! use std::ops::ControlFlow;
//! use trainer::assistant::{Assistant, AssistantOptions};
//!
//! let mut vet = Assistant::load("runs/vet-model".as_ref(), AssistantOptions::default())?;
//! let answer = vet.ask("How often should a puppy be vaccinated?", |piece| {
//!     print!("{piece}");
//!     ControlFlow::Continue(())
//! })?;
//! println!("\n({} tokens)", answer.tokens.len());
//! # Ok::<(), trainer::assistant::AssistantError>(())
//! ```
//!
//! A thin layer over [`crate::chat::Session`] (what `vet-chat` runs): the same prompt
//! template, decoding and stop rules, with typed errors and arrays out.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ndarray::{Array1, Array3};
use reference::model::Batch;
use reference::{InferenceEngine, MambaConfig, State};

use crate::chat::{ChatConfig, Interrupt, Session};
use crate::data::qa::QaTemplate;
use crate::device::{self, EngineOptions, WeightDtype};
use crate::generate::Sampling;
use crate::tokenizer;

pub use crate::chat::{Answer, StopReason};

/// What went wrong, for callers to match on.
#[derive(Debug, thiserror::Error)]
pub enum AssistantError {
    /// The directory or one of its files (config.json, the weights, the tokenizer) does not
    /// exist.
    #[error("model not found: {path}: {msg}")]
    ModelNotFound { path: PathBuf, msg: String },
    /// The checkpoint exists but cannot be read (bad config, truncated or wrong tensors).
    #[error("bad checkpoint {path}: {msg}")]
    BadCheckpoint { path: PathBuf, msg: String },
    /// tokenizer.json is unreadable or does not fit the model.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// The device cannot run the model (unknown device, no CUDA, out of memory, ...).
    #[error("device {device}: {msg}")]
    Device { device: String, msg: String },
    /// The question or text is not usable (empty, encodes to no tokens).
    #[error("bad input: {0}")]
    BadInput(String),
    /// Decoding failed part way.
    #[error("generation: {0}")]
    Generation(String),
}

/// How to load and decode. The defaults: `--device cpu`, f32 weights, every core, greedy
/// answers of at most 256 tokens ending at `<|endoftext|>`.
#[derive(Clone, Debug)]
pub struct AssistantOptions {
    /// `cpu`, `reference`, `reference-f64`, `cuda` or `cuda:N`.
    pub device: String,
    /// CPU worker threads (0 = every core).
    pub threads: usize,
    /// Weight storage on the CPU.
    pub dtype: WeightDtype,
    /// Sampling (temperature 0 = greedy); its `stop_token` is set from the tokenizer.
    pub sampling: Sampling,
    /// The answer is cut before the first of these.
    pub stop_strings: Vec<String>,
    /// A tokenizer.json to use instead of the checkpoint's own (mamba_ssm checkpoints ship
    /// none).
    pub tokenizer: Option<PathBuf>,
}

impl Default for AssistantOptions {
    fn default() -> Self {
        AssistantOptions {
            device: "cpu".into(),
            threads: 0,
            dtype: WeightDtype::F32,
            sampling: Sampling::default(),
            stop_strings: Vec::new(),
            tokenizer: None,
        }
    }
}

/// Stops the answer in progress from another thread (the answer ends at its next token, the
/// conversation intact).
#[derive(Clone, Debug)]
pub struct CancelHandle(Arc<Interrupt>);

impl CancelHandle {
    pub fn cancel(&self) {
        self.0.stop.store(true, Ordering::SeqCst);
    }
}

/// A model, its tokenizer and one conversation.
pub struct Assistant {
    session: Session,
    cfg: MambaConfig,
    dir: PathBuf,
}

fn generation(e: anyhow::Error) -> AssistantError {
    AssistantError::Generation(format!("{e:#}"))
}

impl Assistant {
    /// Loads the checkpoint directory `dir`: config.json, the weights in any layout
    /// ([`crate::checkpoint::check_dir`]), and tokenizer.json or `opts.tokenizer`.
    pub fn load(dir: &Path, opts: AssistantOptions) -> Result<Assistant, AssistantError> {
        let not_found = |e: anyhow::Error| AssistantError::ModelNotFound {
            path: dir.to_path_buf(),
            msg: format!("{e:#}"),
        };
        crate::checkpoint::check_dir(dir).map_err(not_found)?;
        let tok_path =
            crate::checkpoint::tokenizer_file(dir, opts.tokenizer.as_deref()).map_err(not_found)?;
        let bad = |msg: String| AssistantError::BadCheckpoint {
            path: dir.to_path_buf(),
            msg,
        };
        let cfg = MambaConfig::load(&dir.join("config.json")).map_err(|e| bad(e.to_string()))?;
        let tok =
            tokenizer::load(&tok_path, cfg.vocab_size).map_err(|e| AssistantError::Tokenizer {
                path: tok_path.clone(),
                msg: format!("{e:#}"),
            })?;
        let eopts = EngineOptions {
            threads: opts.threads,
            dtype: opts.dtype,
            ..EngineOptions::default()
        };
        let (engine, _) =
            device::load_for_inference(dir, &opts.device, &eopts).map_err(|e| {
                match e.downcast_ref::<reference::Error>() {
                    Some(reference::Error::Device { .. }) | None => AssistantError::Device {
                        device: opts.device.clone(),
                        msg: format!("{e:#}"),
                    },
                    Some(_) => bad(format!("{e:#}")),
                }
            })?;
        let chat = ChatConfig {
            sampling: opts.sampling,
            stop_strings: opts.stop_strings,
            template: QaTemplate::default(),
        };
        let session = Session::new(engine, tok, chat).map_err(generation)?;
        Ok(Assistant {
            session,
            cfg,
            dir: dir.to_path_buf(),
        })
    }

    /// The checkpoint directory this assistant was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &MambaConfig {
        &self.cfg
    }

    /// Answers `question` in the current conversation. `on_piece` sees the answer's text as
    /// it is produced and may stop it (`ControlFlow::Break`, like [`CancelHandle::cancel`]):
    /// the answer then ends with [`StopReason::Interrupted`] and the conversation continues
    /// from what was said.
    pub fn ask(
        &mut self,
        question: &str,
        on_piece: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Answer, AssistantError> {
        if question.trim().is_empty() {
            return Err(AssistantError::BadInput("the question is empty".into()));
        }
        let mut sink = Pieces {
            on_piece,
            interrupt: self.session.interrupt(),
        };
        self.session.ask(question, &mut sink).map_err(generation)
    }

    /// A handle that cancels the answer in progress from another thread.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle(self.session.interrupt())
    }

    /// Forgets the conversation (the next question starts from a zero state).
    pub fn reset(&mut self) -> Result<(), AssistantError> {
        self.session.reset().map_err(generation)
    }

    /// Answered turns since the start or the last [`Assistant::reset`].
    pub fn turns(&self) -> usize {
        self.session.turns()
    }

    /// The recurrent state the conversation has reached (what the next question continues
    /// from; copied off the device for a GPU engine).
    pub fn state(&mut self) -> Result<&State<f32>, AssistantError> {
        self.session.state().map_err(generation)
    }

    /// The next-token logits `[vocab]` after `text`, from a zero state (the conversation is
    /// left as it is).
    pub fn logits(&mut self, text: &str) -> Result<Array1<f32>, AssistantError> {
        let ids = self.encode(text)?;
        let engine = self.session.engine_mut();
        let mut state = State::zeros(engine.config(), 1);
        let mut logits = vec![0f32; engine.config().vocab_size];
        engine
            .prefill(&ids, &mut state, &mut logits)
            .map_err(|e| AssistantError::Generation(e.to_string()))?;
        Ok(Array1::from_vec(logits))
    }

    /// Logits `[1, tokens, vocab]` of every position of `text`, from a zero state.
    pub fn forward(&mut self, text: &str) -> Result<Array3<f32>, AssistantError> {
        let ids = self.encode(text)?;
        forward_array(self.session.engine_mut(), &ids, 1, ids.len())
            .map_err(|e| AssistantError::Generation(e.to_string()))
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, AssistantError> {
        let ids = tokenizer::encode(self.session.tokenizer(), text)
            .map_err(|e| AssistantError::BadInput(format!("{e:#}")))?;
        if ids.is_empty() {
            return Err(AssistantError::BadInput(format!(
                "{text:?} encodes to no tokens"
            )));
        }
        Ok(ids)
    }
}

/// Logits `[batch, seq_len, vocab]` of `tokens` (`[batch, seq_len]`, row-major) from a zero
/// state, as an ndarray array.
pub fn forward_array(
    engine: &mut (impl InferenceEngine + ?Sized),
    tokens: &[u32],
    batch: usize,
    seq_len: usize,
) -> reference::Result<Array3<f32>> {
    let (logits, _) = engine.forward(&Batch::new(tokens, batch, seq_len), None)?;
    let vocab = engine.config().vocab_size;
    Array3::from_shape_vec((batch, seq_len, vocab), logits.data).map_err(|e| {
        reference::Error::Shape {
            op: "forward_array",
            msg: e.to_string(),
        }
    })
}

/// The `Write` that [`Session::ask`] streams into: hands each piece to the caller, and raises
/// the session's stop flag when the caller breaks.
struct Pieces<F> {
    on_piece: F,
    interrupt: Arc<Interrupt>,
}

impl<F: FnMut(&str) -> ControlFlow<()>> Write for Pieces<F> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !buf.is_empty() && (self.on_piece)(&String::from_utf8_lossy(buf)).is_break() {
            self.interrupt.stop.store(true, Ordering::SeqCst);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
