//! Text generation through any [`Engine`]: a prefill forward, then recurrent steps.

use anyhow::{bail, Result};
use reference::model::Batch;
use reference::rng::Rng;
use reference::{Engine, State};

/// How the next token is chosen.
#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0 = greedy (argmax, deterministic).
    pub temperature: f64,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Generation stops after this token.
    pub stop_token: Option<u32>,
    /// CTRL-style penalty on tokens already in the prompt or the answer: positive logits are
    /// divided by it, negative ones multiplied. 1.0 = off.
    pub repetition_penalty: f32,
}

/// Applies [`Sampling::repetition_penalty`] to `logits` for every id in `seen`.
pub fn penalize(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = vec![false; logits.len()];
    for &t in seen {
        let t = t as usize;
        if t < logits.len() && !done[t] {
            done[t] = true;
            logits[t] = if logits[t] > 0.0 {
                logits[t] / penalty
            } else {
                logits[t] * penalty
            };
        }
    }
}

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn sample(logits: &[f32], temperature: f64, rng: &mut Rng) -> u32 {
    if temperature <= 0.0 {
        return argmax(logits);
    }
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let w: Vec<f64> = logits
        .iter()
        .map(|&v| ((v as f64 - m) / temperature).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let mut r = rng.next_f64() * total;
    for (i, &wi) in w.iter().enumerate() {
        r -= wi;
        if r <= 0.0 {
            return i as u32;
        }
    }
    (w.len() - 1) as u32
}

/// Generates after `prompt` (at least one token); calls `on_token` for each new token as it is
/// produced. Returns the new tokens.
pub fn generate(
    engine: &mut dyn Engine,
    prompt: &[u32],
    s: &Sampling,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("the prompt is empty: give at least one token");
    }
    let vocab = engine.config().vocab_size;
    let (logits, mut state): (_, State<f32>) =
        engine.forward(&Batch::new(prompt, 1, prompt.len()), None)?;
    let mut last = logits.data[(prompt.len() - 1) * vocab..].to_vec();
    let mut rng = Rng::new(s.seed);
    let mut out = Vec::new();
    let mut seen = prompt.to_vec();
    for _ in 0..s.max_new_tokens {
        penalize(&mut last, &seen, s.repetition_penalty);
        let next = sample(&last, s.temperature, &mut rng);
        seen.push(next);
        out.push(next);
        on_token(next);
        if Some(next) == s.stop_token {
            break;
        }
        last = engine.step(&[next], None, &mut state)?.data;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_pushes_seen_tokens_down_once_each() {
        let mut l = vec![2.0, -1.0, 3.0, 0.5];
        penalize(&mut l, &[0, 1, 0], 2.0);
        assert_eq!(l, vec![1.0, -2.0, 3.0, 0.5]);
        assert_eq!(argmax(&l), 2);
        let mut same = vec![2.0, -1.0];
        penalize(&mut same, &[0, 1], 1.0);
        assert_eq!(same, vec![2.0, -1.0]);
    }
}
