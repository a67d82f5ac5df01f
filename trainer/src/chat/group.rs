//! Answering several independent questions together: each is prefilled on its own (prompts
//! differ in length), then every decode step advances all of them in one `step_into` over a
//! batch of rows, so the engine reads its weights once per step for the whole group. Each
//! question keeps its own sampler (seeded as a lone run would be), stop strings and token
//! limit, and its answer is the one a lone run draws (see `tests/chat.rs`).

use std::time::Instant;

use anyhow::{Context, Result};
use reference::State;

use super::{Answer, Session, StopReason, TextStream};
use crate::generate::Sampler;
use crate::tokenizer::encode_templated;

/// One question of a group while it is being answered.
struct Row {
    sampler: Sampler,
    stream: TextStream,
    tokens: Vec<u32>,
    prompt_tokens: usize,
    stop: Option<StopReason>,
    prefill: std::time::Duration,
}

/// Sequence states `[n_layer, 1, ...]` stacked into one `[n_layer, B, ...]` state.
fn stack(states: &[State<f32>]) -> State<f32> {
    let gather = |f: &dyn Fn(&State<f32>) -> &reference::Tensor<f32>| {
        let shape = &f(&states[0]).shape;
        let per: usize = shape[2..].iter().product();
        let mut data = Vec::with_capacity(shape[0] * states.len() * per);
        for i in 0..shape[0] {
            for s in states {
                data.extend_from_slice(&f(s).data[i * per..(i + 1) * per]);
            }
        }
        let mut out = shape.clone();
        out[1] = states.len();
        reference::Tensor::from_vec(&out, data)
    };
    State {
        conv: gather(&|s| &s.conv),
        ssm: gather(&|s| &s.ssm),
    }
}

/// Draws the next token of `row` from `logits` as `Generator::run` would, and notes why the
/// row stops, if it does.
fn draw(s: &Session, row: &mut Row, logits: &mut [f32], max: usize) -> Result<()> {
    let t = row.sampler.sample(logits)?;
    row.tokens.push(t);
    row.stream.push(&s.tok, t)?;
    row.stop = if Some(t) == s.eot {
        Some(StopReason::EndOfText)
    } else if row.stream.stopped() {
        Some(StopReason::StopString)
    } else if row.tokens.len() == max {
        Some(StopReason::MaxNewTokens)
    } else {
        None
    };
    Ok(())
}

/// Answers `questions` (each from a fresh state, question `i` sampling from `seeds[i]`)
/// together; returns the answers in order.
pub fn answer_group(s: &mut Session, questions: &[&str], seeds: &[u64]) -> Result<Vec<Answer>> {
    let cfg = s.engine.config().clone();
    let v = cfg.vocab_size;
    let max = s.cfg.sampling.max_new_tokens;
    let b = questions.len();
    let mut rows = Vec::with_capacity(b);
    let mut states = Vec::with_capacity(b);
    let mut logits = vec![0f32; b * v];
    for (i, q) in questions.iter().enumerate() {
        let ids = encode_templated(&s.tok, &s.cfg.template.prompt, q)?;
        anyhow::ensure!(!ids.is_empty(), "the question {q:?} encodes to no tokens");
        let mut sampler = Sampler::new(&s.cfg.sampling, v)?;
        sampler.reseed(seeds[i]);
        sampler.observe(&ids);
        let started = Instant::now();
        let mut st = State::zeros(&cfg, 1);
        s.engine
            .prefill(&ids, &mut st, &mut logits[i * v..(i + 1) * v])
            .context("prefilling the prompt")?;
        states.push(st);
        rows.push(Row {
            sampler,
            stream: TextStream::new(&s.cfg.stop_strings),
            tokens: Vec::new(),
            prompt_tokens: ids.len(),
            stop: None,
            prefill: started.elapsed(),
        });
    }
    let mut state = stack(&states);
    let started = Instant::now();
    let mut feed = vec![0u32; b];
    let mut live = max > 0;
    if max == 0 {
        for r in &mut rows {
            r.stop = Some(StopReason::MaxNewTokens);
        }
    }
    while live {
        live = false;
        for (i, r) in rows.iter_mut().enumerate() {
            if r.stop.is_none() {
                draw(s, r, &mut logits[i * v..(i + 1) * v], max)?;
                live |= r.stop.is_none();
            }
            // A finished row rides along on its last token; its logits are not read again.
            feed[i] = r.tokens.last().copied().unwrap_or(0);
        }
        if live {
            s.engine
                .step_into(&feed, None, &mut state, &mut logits)
                .context("generating the answers")?;
        }
    }
    let decode = started.elapsed();
    Ok(rows
        .into_iter()
        .map(|mut r| {
            r.stream.finish();
            Answer {
                text: r.stream.text().to_string(),
                prompt_tokens: r.prompt_tokens,
                stop: r.stop.unwrap_or(StopReason::MaxNewTokens),
                prefill_time: r.prefill,
                // The group's decode time, shared by its rows.
                decode_time: decode / b as u32,
                tokens: r.tokens,
            }
        })
        .collect())
}
