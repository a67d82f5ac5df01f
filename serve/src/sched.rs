//! The decode loop: one thread owns the engine and decodes every active request together.
//!
//! Each request ([`Job`]) keeps its own recurrent state. A new request is prefilled alone
//! (from the longest cached prefix of its prompt, see [`crate::cache`]); then each iteration
//! draws one token for every active sequence and runs one batched engine step over all of
//! them (their states gathered into one [`State`] of `batch` rows, then scattered back), so
//! one pass over the weights serves the whole batch. At most `max_concurrent` sequences are
//! active; later requests wait in the channel, and past `max_queue` waiting ones
//! [`Scheduler::submit`] refuses (the API answers 429). A request whose receiver is gone (the
//! client disconnected) is dropped at its next token.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;

use anyhow::{Context, Result};
use reference::{InferenceEngine, MambaConfig, State};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;
use trainer::chat::TextStream;
use trainer::generate::{Sampler, Sampling};
use trainer::tokenizer::{encode_text, EOT};

use crate::cache::StateCache;
use crate::metrics::Metrics;
use crate::rows::{gather, scatter};

/// One generation request.
pub struct Job {
    /// The prompt's tokens (at least one).
    pub prompt: Vec<u32>,
    /// Temperature, top-p, seed and `max_new_tokens`; `stop_token` is set to `<|endoftext|>`.
    pub sampling: Sampling,
    /// The answer is cut before the first of these.
    pub stops: Vec<String>,
    /// Keep the state after the answer (and its `<|endoftext|>`) in the cache, keyed by the
    /// prompt plus the answer's tokens: what a chat client sends back next turn.
    pub keep_state: bool,
    /// Draw `max_new_tokens` tokens whatever they are (`<|endoftext|>` does not stop).
    pub ignore_eos: bool,
    pub events: UnboundedSender<Event>,
}

/// What a request hears back, in order: text pieces, then one `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done(Done),
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// `<|endoftext|>` or a stop string.
    Stop,
    /// `max_tokens` were drawn.
    Length,
}

impl Finish {
    pub fn name(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens a cached state stood for (not prefilled).
    pub cached_tokens: usize,
}

/// Limits of the decode loop.
#[derive(Clone, Debug)]
pub struct SchedulerOptions {
    pub max_concurrent: usize,
    pub max_queue: usize,
    pub cache_bytes: usize,
}

/// The queue was full.
#[derive(Debug)]
pub struct Busy;

/// The handle the HTTP side submits jobs through.
pub struct Scheduler {
    tx: Sender<Job>,
    limit: u64,
    metrics: Arc<Metrics>,
}

impl Scheduler {
    /// Starts the decode thread; `load` builds the engine on it (engines need not be `Send`).
    pub fn start(
        load: impl FnOnce() -> Result<Box<dyn InferenceEngine>> + Send + 'static,
        tok: Arc<Tokenizer>,
        opts: SchedulerOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Scheduler> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let m = Arc::clone(&metrics);
        let o = opts.clone();
        std::thread::Builder::new()
            .name("vet-serve-decode".into())
            .spawn(move || match load() {
                Ok(engine) => {
                    let _ = ready_tx.send(Ok(()));
                    Decoder::new(engine, tok, &o, m).run(rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .context("starting the decode thread")?;
        ready_rx
            .recv()
            .context("the decode thread stopped while loading the model")??;
        Ok(Scheduler {
            tx,
            limit: (opts.max_concurrent + opts.max_queue) as u64,
            metrics,
        })
    }

    /// Queues `job`, or refuses it when `max_concurrent + max_queue` requests are in flight.
    pub fn submit(&self, job: Job) -> Result<(), Busy> {
        let taken = self
            .metrics
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.limit).then_some(n + 1)
            });
        if taken.is_err() {
            return Err(Busy);
        }
        if self.tx.send(job).is_err() {
            self.metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(Busy);
        }
        Ok(())
    }
}

/// One active sequence.
struct Seq {
    job: Job,
    state: State<f32>,
    logits: Vec<f32>,
    sampler: Sampler,
    stream: TextStream,
    drawn: Vec<u32>,
    cached: usize,
}

enum Outcome {
    Continue,
    Finished(Finish),
    Cancelled,
}

struct Decoder {
    engine: Box<dyn InferenceEngine>,
    cfg: MambaConfig,
    tok: Arc<Tokenizer>,
    eot: Option<u32>,
    cache: StateCache,
    metrics: Arc<Metrics>,
    max_concurrent: usize,
    active: Vec<Seq>,
    batched: State<f32>,
    tokens: Vec<u32>,
    logits: Vec<f32>,
}

impl Decoder {
    fn new(
        engine: Box<dyn InferenceEngine>,
        tok: Arc<Tokenizer>,
        opts: &SchedulerOptions,
        metrics: Arc<Metrics>,
    ) -> Decoder {
        let cfg = engine.config().clone();
        Decoder {
            batched: State::zeros(&cfg, 1),
            eot: tok.token_to_id(EOT),
            engine,
            cfg,
            tok,
            cache: StateCache::new(opts.cache_bytes),
            metrics,
            max_concurrent: opts.max_concurrent.max(1),
            active: Vec::new(),
            tokens: Vec::new(),
            logits: Vec::new(),
        }
    }

    fn run(mut self, rx: Receiver<Job>) {
        loop {
            if self.active.is_empty() {
                match rx.recv() {
                    Ok(job) => self.admit(job),
                    Err(_) => return,
                }
            }
            while self.active.len() < self.max_concurrent {
                match rx.try_recv() {
                    Ok(job) => self.admit(job),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.set_active();
            self.draw_all();
            self.step_all();
            self.set_active();
        }
    }

    fn set_active(&self) {
        self.metrics
            .active
            .store(self.active.len() as u64, Ordering::Relaxed);
    }

    /// Leaves the books after a request ends one way or another.
    fn release(&self) {
        self.metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Prefills `job`'s prompt (after its longest cached prefix) and makes it active.
    fn admit(&mut self, job: Job) {
        if job.events.is_closed() {
            Metrics::inc(&self.metrics.cancelled);
            self.release();
            return;
        }
        let events = job.events.clone();
        match self.prefill(job) {
            Ok(seq) => self.active.push(seq),
            Err(e) => {
                let _ = events.send(Event::Failed(format!("{e:#}")));
                Metrics::inc(&self.metrics.errors);
                self.release();
            }
        }
    }

    fn prefill(&mut self, mut job: Job) -> Result<Seq> {
        let (cached, mut state) = match self.cache.lookup(&job.prompt) {
            Some(hit) => {
                Metrics::inc(&self.metrics.cache_hits);
                hit
            }
            None => {
                Metrics::inc(&self.metrics.cache_misses);
                (0, State::zeros(&self.cfg, 1))
            }
        };
        let vocab = self.cfg.vocab_size;
        let mut logits = vec![0f32; vocab];
        job.sampling.stop_token = if job.ignore_eos { None } else { self.eot };
        let sampler = Sampler::new(&job.sampling, vocab)?;
        let rest = &job.prompt[cached..];
        self.engine
            .prefill(rest, &mut state, &mut logits)
            .context("prefilling the prompt")?;
        Metrics::add(&self.metrics.prompt_tokens, job.prompt.len() as u64);
        Metrics::add(&self.metrics.prefill_tokens, rest.len() as u64);
        Ok(Seq {
            stream: TextStream::new(&job.stops),
            drawn: Vec::with_capacity(job.sampling.max_new_tokens.min(4096)),
            job,
            state,
            logits,
            sampler,
            cached,
        })
    }

    /// Draws the next token of every active sequence; ends those that are done.
    fn draw_all(&mut self) {
        let mut i = 0;
        // Every active sequence draws one token (counted before any answer is handed back).
        self.metrics.generated(self.active.len() as u64);
        while i < self.active.len() {
            let outcome = draw(&mut self.active[i], &self.tok);
            match outcome {
                Ok(Outcome::Continue) => i += 1,
                Ok(Outcome::Finished(f)) => {
                    let seq = self.active.swap_remove(i);
                    self.finish(seq, f);
                }
                Ok(Outcome::Cancelled) => {
                    self.active.swap_remove(i);
                    Metrics::inc(&self.metrics.cancelled);
                    self.release();
                }
                Err(e) => {
                    let seq = self.active.swap_remove(i);
                    let _ = seq.job.events.send(Event::Failed(format!("{e:#}")));
                    Metrics::inc(&self.metrics.errors);
                    self.release();
                }
            }
        }
    }

    /// One engine step over every active sequence, each fed the token it just drew.
    fn step_all(&mut self) {
        let n = self.active.len();
        if n == 0 {
            return;
        }
        let vocab = self.cfg.vocab_size;
        let result = if n == 1 {
            let s = &mut self.active[0];
            let t = [*s.drawn.last().expect("a drawn token")];
            self.engine.step_into(&t, None, &mut s.state, &mut s.logits)
        } else {
            self.tokens.clear();
            self.tokens
                .extend(self.active.iter().map(|s| *s.drawn.last().expect("drawn")));
            let rows: Vec<&State<f32>> = self.active.iter().map(|s| &s.state).collect();
            gather(&self.cfg, &rows, &mut self.batched);
            self.logits.resize(n * vocab, 0.0);
            let r = self
                .engine
                .step_into(&self.tokens, None, &mut self.batched, &mut self.logits);
            for (b, s) in self.active.iter_mut().enumerate() {
                scatter(&self.cfg, &self.batched, b, &mut s.state);
                s.logits
                    .copy_from_slice(&self.logits[b * vocab..(b + 1) * vocab]);
            }
            r
        };
        self.metrics.step(n as u64);
        if let Err(e) = result {
            for seq in self.active.drain(..) {
                let _ = seq
                    .job
                    .events
                    .send(Event::Failed(format!("decode step: {e}")));
                Metrics::inc(&self.metrics.errors);
                self.metrics.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    fn finish(&mut self, mut seq: Seq, finish: Finish) {
        let rest = seq.stream.finish().to_string();
        if !rest.is_empty() {
            let _ = seq.job.events.send(Event::Text(rest));
        }
        let done = Done {
            finish,
            prompt_tokens: seq.job.prompt.len(),
            completion_tokens: seq.drawn.len(),
            cached_tokens: seq.cached,
        };
        let events = seq.job.events.clone();
        // The state is cached before the answer ends, so a follow-up the client sends as soon
        // as it has the answer finds it.
        if seq.job.keep_state {
            self.keep(seq);
        }
        let _ = events.send(Event::Done(done));
        Metrics::inc(&self.metrics.finished);
        self.release();
    }

    /// Caches the state after the prompt, the answer and `<|endoftext|>` when the answer's
    /// text tokenizes back to the tokens drawn (so a client that sends the answer back
    /// produces exactly this sequence).
    fn keep(&mut self, mut seq: Seq) {
        let (Some(eot), Some(&last)) = (self.eot, seq.drawn.last()) else {
            return;
        };
        let body = match seq.drawn.split_last() {
            Some((&t, body)) if t == eot => body,
            _ => &seq.drawn[..],
        };
        match encode_text(&self.tok, seq.stream.text()) {
            Ok(ids) if ids == body => {}
            _ => return,
        }
        let mut feed = vec![last];
        if last != eot {
            feed.push(eot);
        }
        if self
            .engine
            .prefill(&feed, &mut seq.state, &mut seq.logits)
            .is_err()
        {
            return;
        }
        let mut key = std::mem::take(&mut seq.job.prompt);
        key.extend_from_slice(body);
        key.push(eot);
        self.cache.insert(key, seq.state);
        let m = &self.metrics;
        m.cache_entries
            .store(self.cache.len() as u64, Ordering::Relaxed);
        m.cache_bytes
            .store(self.cache.bytes() as u64, Ordering::Relaxed);
    }
}

/// Draws `seq`'s next token and hands out the text it completes.
fn draw(seq: &mut Seq, tok: &Tokenizer) -> Result<Outcome> {
    let t = seq.sampler.sample(&mut seq.logits)?;
    seq.drawn.push(t);
    if Some(t) == seq.job.sampling.stop_token {
        return Ok(Outcome::Finished(Finish::Stop));
    }
    let piece = seq.stream.push(tok, t)?;
    if !piece.is_empty() && seq.job.events.send(Event::Text(piece.to_string())).is_err() {
        return Ok(Outcome::Cancelled);
    }
    if seq.stream.stopped() {
        return Ok(Outcome::Finished(Finish::Stop));
    }
    if seq.drawn.len() >= seq.job.sampling.max_new_tokens {
        return Ok(Outcome::Finished(Finish::Length));
    }
    if seq.job.events.is_closed() {
        return Ok(Outcome::Cancelled);
    }
    Ok(Outcome::Continue)
}
