//! Answering many independent questions together by continuous batching
//! ([`crate::batched::Batcher`]): up to `batch` questions are in flight, each in its own row
//! of the engine's state; every decode step advances all of them at once (one pass over the
//! weights), and a finished answer frees its row for the next question. Each question keeps
//! its own sampler (seeded as a lone run would be), stop strings and token limit, and its
//! answer is the one a lone run draws (see `tests/chat.rs`).

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{Answer, Session, StopReason, TextStream};
use crate::batched::Batcher;
use crate::generate::{Sampler, Stop};
use crate::tokenizer::encode_templated;

/// One question while it is being answered.
struct Row {
    stream: TextStream,
    tokens: Vec<u32>,
    prompt_tokens: usize,
    stop: Option<StopReason>,
    prefill: Duration,
    decode: Duration,
}

/// Answers `questions` (each from a fresh state, question `i` sampling from `seeds[i]`) with
/// up to `batch` in flight, drawing on the device where the engine can; calls `on_answer(i,
/// answer)` as each finishes (in any order).
pub fn answer_all(
    s: &mut Session,
    questions: &[&str],
    seeds: &[u64],
    batch: usize,
    mut on_answer: impl FnMut(usize, Answer) -> Result<()>,
) -> Result<()> {
    let v = s.engine.config().vocab_size;
    let sampleable = s.tok.get_vocab_size(true);
    let slots = batch.min(questions.len()).max(1);
    let mut b = Batcher::new(s.engine.as_mut(), slots)?.sample_on_device(true);
    let mut rows: Vec<Option<Row>> = questions.iter().map(|_| None).collect();
    let mut next = 0;
    loop {
        while b.has_free() && next < questions.len() {
            let q = questions[next];
            let ids = encode_templated(&s.tok, &s.cfg.template.prompt, q)?;
            anyhow::ensure!(!ids.is_empty(), "the question {q:?} encodes to no tokens");
            let mut sampler = Sampler::new(&s.cfg.sampling, v)?;
            sampler.limit_to(sampleable);
            sampler.reseed(seeds[next]);
            let started = Instant::now();
            b.admit(s.engine.as_mut(), next, &ids, sampler)
                .context("prefilling the prompt")?;
            rows[next] = Some(Row {
                stream: TextStream::new(&s.cfg.stop_strings),
                tokens: Vec::new(),
                prompt_tokens: ids.len(),
                stop: None,
                prefill: started.elapsed(),
                decode: Duration::ZERO,
            });
            next += 1;
        }
        let active = b.active();
        if active == 0 {
            return Ok(());
        }
        let started = Instant::now();
        let mut err = None;
        let done = b
            .step(s.engine.as_mut(), |i, t| {
                let r = rows[i].as_mut().expect("a row in flight");
                r.tokens.push(t);
                if let Err(e) = r.stream.push(&s.tok, t) {
                    err = Some(e);
                    return ControlFlow::Break(());
                }
                if Some(t) == s.eot {
                    r.stop = Some(StopReason::EndOfText);
                } else if r.stream.stopped() {
                    r.stop = Some(StopReason::StopString);
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            })
            .context("generating the answers")?;
        if let Some(e) = err {
            return Err(e);
        }
        // The step's time, shared by the rows it advanced.
        let share = started.elapsed() / active as u32;
        for r in rows.iter_mut().flatten() {
            r.decode += share;
        }
        for (i, why) in done {
            let mut r = rows[i].take().expect("a finished row");
            r.stream.finish();
            let stop = r.stop.unwrap_or(match why {
                Stop::MaxTokens | Stop::Caller => StopReason::MaxNewTokens,
                Stop::Token => StopReason::EndOfText,
            });
            on_answer(
                i,
                Answer {
                    text: r.stream.text().to_string(),
                    prompt_tokens: r.prompt_tokens,
                    stop,
                    prefill_time: r.prefill,
                    decode_time: r.decode,
                    tokens: r.tokens,
                },
            )?;
        }
    }
}
