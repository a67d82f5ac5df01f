//! QA evaluation: greedy answers to held-out questions, scored by exact match and token F1
//! (SQuAD-style normalisation: lower case, punctuation and the articles a/an/the removed).

use std::collections::HashMap;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::Path;

use anyhow::{Context, Result};
use reference::InferenceEngine;
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::batched::generate_batched;
use crate::data::qa::{QaPair, QaTemplate};
use crate::generate::{Sampler, Sampling};
use crate::tokenizer::{decode, encode_templated, EOT};

/// Words of `s` after SQuAD normalisation.
pub fn normalize(s: &str) -> Vec<String> {
    s.to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() {
                c
            } else {
                ' '
            }
        })
        .collect::<String>()
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(str::to_string)
        .collect()
}

/// 1.0 when the normalised words are equal.
pub fn exact_match(prediction: &str, reference: &str) -> f64 {
    f64::from(u8::from(normalize(prediction) == normalize(reference)))
}

/// Harmonic mean of word precision and recall (multiset overlap).
pub fn token_f1(prediction: &str, reference: &str) -> f64 {
    let (p, r) = (normalize(prediction), normalize(reference));
    if p.is_empty() || r.is_empty() {
        return f64::from(u8::from(p == r));
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for w in &r {
        *counts.entry(w).or_default() += 1;
    }
    let mut same = 0;
    for w in &p {
        if let Some(c) = counts.get_mut(w.as_str()) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / p.len() as f64;
    let recall = same as f64 / r.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Questions answered together (continuous batching, [`generate_batched`]).
pub const QA_EVAL_BATCH: usize = 8;

/// One scored answer.
#[derive(Clone, Debug, Serialize)]
pub struct QaRecord {
    pub question: String,
    pub reference: String,
    pub answer: String,
    pub exact_match: f64,
    pub f1: f64,
}

/// Mean scores over the answered questions.
#[derive(Clone, Debug, Serialize)]
pub struct QaScores {
    pub questions: usize,
    pub exact_match: f64,
    pub f1: f64,
}

/// Answers up to `limit` pairs greedily (at most `max_new_tokens` each, stopping at
/// `<|endoftext|>`; `repetition_penalty` 1.0 for plain greedy), scores them and writes one JSON line per answer to `report`.
pub fn evaluate_qa(
    engine: &mut dyn InferenceEngine,
    tok: &Tokenizer,
    pairs: &[QaPair],
    limit: usize,
    max_new_tokens: usize,
    repetition_penalty: f32,
    report: &Path,
) -> Result<QaScores> {
    let template = QaTemplate::default();
    let eot = tok.token_to_id(EOT);
    let sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        max_new_tokens,
        seed: 0,
        stop_token: eot,
        repetition_penalty,
    };
    let pairs: Vec<&QaPair> = pairs.iter().take(limit).collect();
    let prompts = pairs
        .iter()
        .map(|p| encode_templated(tok, &template.prompt, &p.question))
        .collect::<Result<Vec<_>>>()?;
    let vocab = engine.config().vocab_size;
    let samplers = (0..prompts.len())
        .map(|_| Sampler::new(&sampling, vocab))
        .collect::<Result<Vec<_>>>()?;
    // Greedy answers: the same tokens at any batch, drawn on the device where it can.
    let answers = generate_batched(engine, &prompts, samplers, QA_EVAL_BATCH, true, |_, _| {
        ControlFlow::Continue(())
    })?;
    let mut out = Vec::new();
    for (p, (mut ids, _)) in pairs.into_iter().zip(answers) {
        if ids.last().copied() == eot {
            ids.pop();
        }
        let answer = decode(tok, &ids)?.trim().to_string();
        out.push(QaRecord {
            exact_match: exact_match(&answer, &p.answer),
            f1: token_f1(&answer, &p.answer),
            question: p.question.clone(),
            reference: p.answer.clone(),
            answer,
        });
    }
    let mut text = Vec::new();
    for r in &out {
        writeln!(text, "{}", serde_json::to_string(r)?)?;
    }
    reference::fs::atomic_write(report, &text)
        .with_context(|| format!("writing QA report {}", report.display()))?;
    let n = out.len().max(1) as f64;
    Ok(QaScores {
        questions: out.len(),
        exact_match: out.iter().map(|r| r.exact_match).sum::<f64>() / n,
        f1: out.iter().map(|r| r.f1).sum::<f64>() / n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn normalisation_drops_case_punctuation_and_articles() {
        assert_eq!(
            normalize("The Dog's  BITE, an issue!"),
            vec!["dog", "s", "bite", "issue"]
        );
        assert_eq!(exact_match("Vaccinate the puppy.", "vaccinate puppy"), 1.0);
        assert_eq!(exact_match("vaccinate kitten", "vaccinate puppy"), 0.0);
    }

    #[test]
    fn f1_counts_overlapping_words_once_each() {
        assert_relative_eq!(token_f1("fever and cough", "cough fever"), 0.8);
        assert_eq!(token_f1("x y z", "a b"), 0.0);
        assert_relative_eq!(token_f1("cough cough", "cough"), 2.0 / 3.0);
        assert_eq!(token_f1("", ""), 1.0);
    }
}
