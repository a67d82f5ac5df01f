//! `vet-chat`: question answering and multi-turn chat with a checkpoint, usable without a
//! terminal (the binary is a thin shell around [`Session`], [`repl::run`] and [`batch::run`]).
//!
//! A conversation is one token sequence: each turn's question rendered with the fine-tuning
//! [`QaTemplate`], the answer's tokens as they were drawn, and `<|endoftext|>` (appended when
//! the answer did not end with it). The model's recurrent [`State`] after that sequence is
//! kept between turns, so a new turn prefills only its own templated question (plus the
//! previous answer's last token, which decoding never feeds to the model), never the history.

pub mod batch;
pub mod group;
pub mod repl;
pub mod stream;

use std::io::Write;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reference::{DecodeState, InferenceEngine, State};
use tokenizers::Tokenizer;

use crate::data::qa::QaTemplate;
use crate::generate::{Generator, Sampling, Stop};
use crate::tokenizer::{encode_templated, encode_text, EOT};
pub use stream::TextStream;

/// Why an answer ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model wrote `<|endoftext|>`.
    EndOfText,
    /// A `--stop` string appeared (the answer is cut before it).
    StopString,
    /// `--max-new-tokens` were drawn.
    MaxNewTokens,
    /// The user interrupted it (Ctrl-C, see [`Interrupt`]).
    Interrupted,
}

impl StopReason {
    pub fn name(self) -> &'static str {
        match self {
            StopReason::EndOfText => "eot",
            StopReason::StopString => "stop_string",
            StopReason::MaxNewTokens => "max_new_tokens",
            StopReason::Interrupted => "interrupted",
        }
    }
}

/// One answer and what it cost.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The decoded answer, cut before a stop string; `<|endoftext|>` is not part of it.
    pub text: String,
    /// The tokens drawn, the end token included.
    pub tokens: Vec<u32>,
    /// Tokens prefilled for this turn.
    pub prompt_tokens: usize,
    pub stop: StopReason,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl Answer {
    /// The one timing line printed after an answer (stderr).
    pub fn timing_line(&self) -> String {
        let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
        format!(
            "[prompt: {} tokens, {:.1} tok/s prefill | answer: {} tokens, {:.1} tok/s decode | stop: {}]",
            self.prompt_tokens,
            rate(self.prompt_tokens, self.prefill_time),
            self.tokens.len(),
            rate(self.tokens.len(), self.decode_time),
            self.stop.name()
        )
    }
}

/// What a session generates with.
#[derive(Clone, Debug)]
pub struct ChatConfig {
    /// `stop_token` is filled in from the tokenizer (`<|endoftext|>`).
    pub sampling: Sampling,
    /// The answer is cut before the first of these.
    pub stop_strings: Vec<String>,
    pub template: QaTemplate,
}

/// Stopping an answer early from another thread (a Ctrl-C handler): while `busy` (an answer
/// is being written), a handler sets `stop` and the answer ends at its next token, the
/// conversation intact; otherwise the handler may end the program.
#[derive(Debug, Default)]
pub struct Interrupt {
    pub busy: AtomicBool,
    pub stop: AtomicBool,
}

/// A model, its tokenizer and the state of one conversation.
pub struct Session {
    engine: Box<dyn InferenceEngine>,
    tok: Tokenizer,
    cfg: ChatConfig,
    eot: Option<u32>,
    gen: Generator,
    stream: TextStream,
    state: DecodeState,
    /// Tokens of the conversation not yet run through the model (the last answer's end).
    pending: Vec<u32>,
    /// Every token of the conversation so far, `pending` included.
    history: Vec<u32>,
    turns: usize,
    interrupt: Arc<Interrupt>,
}

impl Session {
    pub fn new(
        mut engine: Box<dyn InferenceEngine>,
        tok: Tokenizer,
        cfg: ChatConfig,
    ) -> Result<Session> {
        let eot = tok.token_to_id(EOT);
        let mut sampling = cfg.sampling.clone();
        sampling.stop_token = eot;
        let mut gen = Generator::new(&sampling, engine.config().vocab_size)?;
        // A vocabulary mamba_ssm padded (50,277 -> 50,280): the padding ids are never drawn.
        gen.sampler.limit_to(tok.get_vocab_size(true));
        let state = DecodeState::zeros(engine.as_mut(), 1).context("starting the decode state")?;
        Ok(Session {
            stream: TextStream::new(&cfg.stop_strings),
            cfg: ChatConfig { sampling, ..cfg },
            engine,
            tok,
            eot,
            gen,
            state,
            pending: Vec::new(),
            history: Vec::new(),
            turns: 0,
            interrupt: Arc::default(),
        })
    }

    /// The engine, for calls beside the conversation (they must not touch its state).
    pub fn engine_mut(&mut self) -> &mut dyn InferenceEngine {
        self.engine.as_mut()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    /// The engine's name ("reference-f32", "simd", "cuda:0").
    pub fn engine_name(&self) -> String {
        self.engine.name()
    }

    /// Whether the tokenizer has `<|endoftext|>` (otherwise answers end only at the token limit
    /// or a stop string).
    pub fn has_eot(&self) -> bool {
        self.eot.is_some()
    }

    /// The flags that stop an answer early (for a Ctrl-C handler).
    pub fn interrupt(&self) -> Arc<Interrupt> {
        Arc::clone(&self.interrupt)
    }

    /// Answered turns since the start or the last [`Session::reset`].
    pub fn turns(&self) -> usize {
        self.turns
    }

    /// Every token of the conversation so far: what the kept state stands for, plus the last
    /// answer's end that the next turn prefills.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Forgets the conversation and restarts the random stream from the configured seed.
    pub fn reset(&mut self) -> Result<()> {
        self.reset_with_seed(self.cfg.sampling.seed)
    }

    /// Forgets the conversation and restarts the random stream from `seed`.
    pub fn reset_with_seed(&mut self, seed: u64) -> Result<()> {
        let zeros = State::zeros(self.engine.config(), 1);
        self.state
            .set(self.engine.as_mut(), zeros)
            .context("resetting the decode state")?;
        self.pending.clear();
        self.history.clear();
        self.turns = 0;
        self.gen.sampler.reseed(seed);
        Ok(())
    }

    /// The recurrent state the conversation has reached (copied off the device for a GPU
    /// engine).
    pub fn state(&mut self) -> Result<&State<f32>> {
        Ok(self.state.state(self.engine.as_mut())?)
    }

    /// Answers `question` (rendered with the QA template) in the current conversation,
    /// writing the answer's text to `out` as it is produced.
    pub fn ask(&mut self, question: &str, out: &mut dyn Write) -> Result<Answer> {
        if question.trim().is_empty() {
            bail!("the question is empty");
        }
        // The question's text never produces a special token (encode_templated).
        let ids = encode_templated(&self.tok, &self.cfg.template.prompt, question)?;
        self.turn(&ids, &self.cfg.template.render(question), out)
    }

    /// Continues the conversation with raw `text` (no template).
    pub fn complete(&mut self, text: &str, out: &mut dyn Write) -> Result<Answer> {
        if text.is_empty() {
            bail!("the prompt is empty");
        }
        let ids = encode_text(&self.tok, text)?;
        self.turn(&ids, text, out)
    }

    fn turn(&mut self, ids: &[u32], prompt: &str, out: &mut dyn Write) -> Result<Answer> {
        let prompt_ids = ids.to_vec();
        if prompt_ids.is_empty() {
            bail!("the prompt {prompt:?} encodes to no tokens");
        }
        let mut feed = std::mem::take(&mut self.pending);
        feed.extend_from_slice(&prompt_ids);
        let started = Instant::now();
        self.gen
            .prefill(self.engine.as_mut(), &feed, &mut self.state)
            .context("prefilling the prompt")?;
        let prefill_time = started.elapsed();
        self.history.extend_from_slice(&prompt_ids);
        // The penalty context is this turn: its prompt and its answer.
        self.gen.sampler.clear_seen();
        self.gen.sampler.observe(&prompt_ids);
        self.stream.clear();
        let started = Instant::now();
        let (tok, stream) = (&self.tok, &mut self.stream);
        let mut failed: Option<anyhow::Error> = None;
        let mut interrupted = false;
        let flags = Arc::clone(&self.interrupt);
        flags.stop.store(false, Ordering::SeqCst);
        flags.busy.store(true, Ordering::SeqCst);
        let stop = self
            .gen
            .run(self.engine.as_mut(), &mut self.state, |id| {
                let shown = stream.push(tok, id).and_then(|piece| {
                    out.write_all(piece.as_bytes())?;
                    out.flush()?;
                    Ok(())
                });
                match shown {
                    Err(e) => {
                        failed = Some(e);
                        ControlFlow::Break(())
                    }
                    Ok(()) if stream.stopped() => ControlFlow::Break(()),
                    Ok(()) if flags.stop.swap(false, Ordering::SeqCst) => {
                        interrupted = true;
                        ControlFlow::Break(())
                    }
                    Ok(()) => ControlFlow::Continue(()),
                }
            })
            .context("generating the answer");
        flags.busy.store(false, Ordering::SeqCst);
        let stop = stop?;
        if let Some(e) = failed {
            return Err(e.context("writing the answer"));
        }
        out.write_all(stream.finish().as_bytes())?;
        out.flush()?;
        let decode_time = started.elapsed();
        let tokens = self.gen.tokens.clone();
        // The last token drawn was never fed to the model; the next turn prefills it, and an
        // end token when the answer stopped without one.
        self.history.extend_from_slice(&tokens);
        if let Some(&last) = tokens.last() {
            self.pending.push(last);
            if stop != Stop::Token {
                self.pending.extend(self.eot);
                self.history.extend(self.eot);
            }
        }
        self.turns += 1;
        Ok(Answer {
            text: self.stream.text().to_string(),
            tokens,
            prompt_tokens: feed.len(),
            stop: match stop {
                Stop::Token => StopReason::EndOfText,
                Stop::Caller if interrupted => StopReason::Interrupted,
                Stop::Caller => StopReason::StopString,
                Stop::MaxTokens => StopReason::MaxNewTokens,
            },
            prefill_time,
            decode_time,
        })
    }
}
