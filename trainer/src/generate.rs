//! Text generation through any [`InferenceEngine`]: one prefill, then recurrent steps into a reused
//! logits buffer, with an allocation-free sampler.
//!
//! Sampling follows Hugging Face's order: repetition penalty on the raw logits, then
//! temperature, then top-k, then top-p (nucleus) on the temperature-scaled probabilities, then
//! a draw. Temperature 0 is greedy: the argmax of the (penalised) logits, no draw.

use std::ops::ControlFlow;

use anyhow::{bail, Result};
use reference::rng::Rng;
use reference::{DecodeState, InferenceEngine};

/// How the next token is chosen.
#[derive(Clone, Debug)]
pub struct Sampling {
    /// 0 = greedy (argmax, deterministic).
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens before drawing; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1.0 = off.
    pub top_p: f64,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Generation stops after this token.
    pub stop_token: Option<u32>,
    /// CTRL-style penalty on tokens already in the prompt or the answer: positive logits are
    /// divided by it, negative ones multiplied. 1.0 = off.
    pub repetition_penalty: f32,
}

impl Default for Sampling {
    /// Greedy, no penalty, 256 new tokens, no stop token.
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 256,
            seed: 0,
            stop_token: None,
            repetition_penalty: 1.0,
        }
    }
}

impl Sampling {
    /// An error naming the setting unless every value is usable.
    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!(
                "temperature {} must be a finite number >= 0 (0 = greedy)",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top-p {} must be in (0, 1] (1 = off)", self.top_p);
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            bail!(
                "repetition penalty {} must be a finite number > 0 (1 = off)",
                self.repetition_penalty
            );
        }
        Ok(())
    }

    /// Whether the next token is the argmax (no random draw).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
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
            logits[t] = penalized(logits[t], penalty);
        }
    }
}

fn penalized(v: f32, penalty: f32) -> f32 {
    if v > 0.0 {
        v / penalty
    } else {
        v * penalty
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

/// Picks tokens from logits without allocating: every buffer is sized to the vocabulary once.
///
/// It remembers the tokens it has seen (the penalty context): [`Sampler::observe`] adds the
/// prompt, and every sampled token is added as it is drawn.
pub struct Sampler {
    s: Sampling,
    vocab: usize,
    rng: Rng,
    /// The seed `rng` started from.
    seed: u64,
    /// `seen[t]`: token `t` is in the penalty context; `seen_ids` lists those tokens once each.
    seen: Vec<bool>,
    seen_ids: Vec<u32>,
    /// Ids at or above this are never drawn: the rows mamba_ssm pads the vocabulary with
    /// beyond the tokenizer's (50,277 -> 50,280) ([`Sampler::limit_to`]).
    sampleable: usize,
    /// Candidate token ids, most likely first once filtered.
    idx: Vec<u32>,
    /// Unnormalised probabilities of `idx`.
    weights: Vec<f64>,
}

impl Sampler {
    pub fn new(s: &Sampling, vocab: usize) -> Result<Sampler> {
        s.check()?;
        if vocab == 0 {
            bail!("cannot sample from an empty vocabulary");
        }
        Ok(Sampler {
            s: s.clone(),
            vocab,
            rng: Rng::new(s.seed),
            seed: s.seed,
            seen: vec![false; vocab],
            seen_ids: Vec::with_capacity(vocab),
            sampleable: vocab,
            idx: Vec::with_capacity(vocab),
            weights: Vec::with_capacity(vocab),
        })
    }

    pub fn sampling(&self) -> &Sampling {
        &self.s
    }

    /// Never draws ids `>= n` (the tokenizer's size when the model's vocabulary is padded
    /// beyond it): their logits are set to -inf before each draw.
    pub fn limit_to(&mut self, n: usize) {
        self.sampleable = n.clamp(1, self.vocab);
    }

    /// Restarts the random stream from `seed`.
    pub fn reseed(&mut self, seed: u64) {
        self.rng = Rng::new(seed);
        self.seed = seed;
    }

    /// These settings for an engine that draws on the device
    /// ([`reference::InferenceEngine::step_held_sample`]), its `draw`-th draw.
    pub fn row_sampling(&self, draw: u64) -> reference::RowSampling {
        reference::RowSampling {
            temperature: self.s.temperature as f32,
            top_k: self.s.top_k.min(u32::MAX as usize) as u32,
            top_p: self.s.top_p as f32,
            repetition_penalty: self.s.repetition_penalty,
            seed: self.seed,
            draw,
            sampleable: self.sampleable as u32,
        }
    }

    /// Empties the penalty context.
    pub fn clear_seen(&mut self) {
        for &t in &self.seen_ids {
            self.seen[t as usize] = false;
        }
        self.seen_ids.clear();
    }

    /// Adds `tokens` to the penalty context (ids outside the vocabulary are ignored).
    pub fn observe(&mut self, tokens: &[u32]) {
        for &t in tokens {
            if (t as usize) < self.vocab && !self.seen[t as usize] {
                self.seen[t as usize] = true;
                self.seen_ids.push(t);
            }
        }
    }

    /// Chooses the next token from `logits` (`[vocab]`; penalised in place) and adds it to the
    /// penalty context.
    pub fn sample(&mut self, logits: &mut [f32]) -> Result<u32> {
        if logits.len() != self.vocab {
            bail!(
                "sampler: {} logits for a vocabulary of {}",
                logits.len(),
                self.vocab
            );
        }
        logits[self.sampleable..].fill(f32::NEG_INFINITY);
        if self.s.repetition_penalty != 1.0 {
            for &t in &self.seen_ids {
                logits[t as usize] = penalized(logits[t as usize], self.s.repetition_penalty);
            }
        }
        let t = if self.s.is_greedy() {
            let t = argmax(logits);
            if !logits[t as usize].is_finite() {
                bail!("the model's logits are not finite (NaN or infinite): cannot choose a token");
            }
            t
        } else {
            let total = self.candidates(logits)?;
            let mut r = self.rng.next_f64() * total;
            let mut pick = self.idx[self.idx.len() - 1];
            for (&i, &w) in self.idx.iter().zip(&self.weights) {
                r -= w;
                if r <= 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        };
        self.observe(&[t]);
        Ok(t)
    }

    /// Fills the candidate list (temperature, then top-k, then top-p) and returns the sum of
    /// its unnormalised weights. With top-k and top-p off the candidates are the whole
    /// vocabulary in id order; otherwise the most likely first (ties: lower id first).
    fn candidates(&mut self, logits: &[f32]) -> Result<f64> {
        let (k, p, temp) = (self.s.top_k, self.s.top_p, self.s.temperature);
        self.idx.clear();
        self.idx.extend(0..self.vocab as u32);
        if k > 0 || p < 1.0 {
            let desc = |a: &u32, b: &u32| {
                logits[*b as usize]
                    .total_cmp(&logits[*a as usize])
                    .then(a.cmp(b))
            };
            if k > 0 && k < self.vocab {
                self.idx.select_nth_unstable_by(k - 1, desc);
                self.idx.truncate(k);
            }
            self.idx.sort_unstable_by(desc);
        }
        let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        self.weights.clear();
        let mut total = 0.0;
        for &i in &self.idx {
            let w = ((logits[i as usize] as f64 - m) / temp).exp();
            total += w;
            self.weights.push(w);
        }
        if !(total.is_finite() && total > 0.0 && m.is_finite()) {
            bail!("the model's logits are not finite (NaN or infinite): cannot sample");
        }
        if p < 1.0 {
            let (mut cum, mut keep) = (0.0, self.idx.len());
            for (n, &w) in self.weights.iter().enumerate() {
                cum += w;
                if cum >= p * total {
                    keep = n + 1;
                    break;
                }
            }
            self.idx.truncate(keep);
            self.weights.truncate(keep);
            total = self.weights.iter().sum();
        }
        Ok(total)
    }

    /// The tokens that survive temperature, top-k and top-p for `logits`, most likely first,
    /// with their renormalised probabilities (for tests and inspection; allocates).
    pub fn distribution(&mut self, logits: &[f32]) -> Result<Vec<(u32, f64)>> {
        let total = self.candidates(logits)?;
        let mut out: Vec<(u32, f64)> = self
            .idx
            .iter()
            .zip(&self.weights)
            .map(|(&i, &w)| (i, w / total))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(out)
    }
}

/// Why [`Generator::run`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The stop token ([`Sampling::stop_token`]) was drawn.
    Token,
    /// `max_new_tokens` were drawn.
    MaxTokens,
    /// The caller's callback asked to stop (a stop string, a closed output).
    Caller,
}

/// The decode loop: logits from a prefill, then one step per token into the same buffer, on a
/// [`DecodeState`] (held in device memory by a GPU engine, so a step moves only the token in
/// and the logits out). After [`Generator::prefill`] nothing in [`Generator::run`] allocates
/// (given an engine whose `step_into` does not), so its cost per token is the model's.
///
/// The last token drawn is *not* fed to the model (its logits are never needed): a caller that
/// continues the sequence prefills it first.
pub struct Generator {
    pub sampler: Sampler,
    /// Logits of the next position, `[vocab]`.
    pub logits: Vec<f32>,
    /// The tokens the last [`Generator::run`] drew, the stop token included.
    pub tokens: Vec<u32>,
}

impl Generator {
    pub fn new(s: &Sampling, vocab: usize) -> Result<Generator> {
        Ok(Generator {
            sampler: Sampler::new(s, vocab)?,
            logits: vec![0.0; vocab],
            // Beyond 2^20 tokens the buffer grows by doubling (rarely, never per token).
            tokens: Vec::with_capacity(s.max_new_tokens.min(1 << 20)),
        })
    }

    /// Runs `tokens` (at least one) from `state` and keeps the last position's logits.
    pub fn prefill<E: InferenceEngine + ?Sized>(
        &mut self,
        engine: &mut E,
        tokens: &[u32],
        state: &mut DecodeState,
    ) -> Result<()> {
        if tokens.is_empty() {
            bail!("the prompt is empty: give at least one token");
        }
        state.prefill(engine, tokens, &mut self.logits)?;
        Ok(())
    }

    /// Draws up to `max_new_tokens` tokens after the current logits, stepping `state` through
    /// each but the last. `on_token` sees every token as it is drawn, the stop token included,
    /// and may stop the loop.
    pub fn run<E: InferenceEngine + ?Sized>(
        &mut self,
        engine: &mut E,
        state: &mut DecodeState,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Stop> {
        self.tokens.clear();
        let (max, stop_token) = {
            let s = self.sampler.sampling();
            (s.max_new_tokens, s.stop_token)
        };
        for n in 1..=max {
            let t = self.sampler.sample(&mut self.logits)?;
            self.tokens.push(t);
            let asked = on_token(t).is_break();
            if Some(t) == stop_token {
                return Ok(Stop::Token);
            }
            if asked {
                return Ok(Stop::Caller);
            }
            if n == max {
                break;
            }
            state.step(engine, &[t], None, &mut self.logits)?;
        }
        Ok(Stop::MaxTokens)
    }
}

/// Generates after `prompt` (at least one token) from a zero state; calls `on_token` for each
/// new token as it is produced. Returns the new tokens.
pub fn generate(
    engine: &mut dyn InferenceEngine,
    prompt: &[u32],
    s: &Sampling,
    on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let vocab = engine.config().vocab_size;
    generate_within(engine, prompt, s, vocab, on_token)
}

/// [`generate`] drawing only ids below `sampleable` (the tokenizer's size: a vocabulary
/// mamba_ssm padded has rows no token stands for).
pub fn generate_within(
    engine: &mut dyn InferenceEngine,
    prompt: &[u32],
    s: &Sampling,
    sampleable: usize,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("the prompt is empty: give at least one token");
    }
    let mut g = Generator::new(s, engine.config().vocab_size)?;
    g.sampler.limit_to(sampleable);
    let mut state = DecodeState::zeros(engine, 1)?;
    g.prefill(engine, prompt, &mut state)?;
    g.sampler.observe(prompt);
    g.run(engine, &mut state, |t| {
        on_token(t);
        ControlFlow::Continue(())
    })?;
    Ok(std::mem::take(&mut g.tokens))
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;

    fn sampling(temperature: f64, top_k: usize, top_p: f64) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
            ..Sampling::default()
        }
    }

    fn close(got: &[(u32, f64)], want: &[(u32, f64)]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.0, w.0, "{got:?} vs {want:?}");
            // Logits are f32: ln(p) rounds at ~1e-8 relative.
            assert_abs_diff_eq!(g.1, w.1, epsilon = 1e-7);
        }
    }

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

    #[test]
    fn padding_ids_past_the_tokenizer_are_never_drawn() {
        // The padded rows hold the largest logits: they would win every draw.
        let logits = vec![0.5f32, 1.0, 0.2, 9.0, 8.0];
        for s in [
            sampling(0.0, 0, 1.0),
            sampling(1.0, 0, 1.0),
            sampling(2.0, 3, 0.9),
        ] {
            let mut sampler = Sampler::new(&s, 5).unwrap();
            sampler.limit_to(3);
            for seed in 0..50 {
                sampler.reseed(seed);
                let t = sampler.sample(&mut logits.clone()).unwrap();
                assert!(t < 3, "drew padding id {t}");
            }
        }
    }

    #[test]
    fn sampler_penalises_its_context_once_per_token() {
        // Greedy with penalty 2: token 0 (logit 2.0, seen twice) drops to 1.0, token 2 (2.5,
        // unseen) wins; after it is drawn it is penalised too, so the next pick is token 3.
        let s = Sampling {
            repetition_penalty: 2.0,
            ..Sampling::default()
        };
        let mut sm = Sampler::new(&s, 4).unwrap();
        sm.observe(&[0, 0, 1]);
        let mut l = vec![2.0, -1.0, 2.5, 1.5];
        assert_eq!(sm.sample(&mut l).unwrap(), 2);
        assert_eq!(l, vec![1.0, -2.0, 2.5, 1.5]);
        let mut l = vec![2.0, -1.0, 2.5, 1.5];
        assert_eq!(sm.sample(&mut l).unwrap(), 3);
        sm.clear_seen();
        let mut l = vec![2.0, -1.0, 2.5, 1.5];
        assert_eq!(sm.sample(&mut l).unwrap(), 2);
    }

    #[test]
    fn top_k_keeps_the_k_largest_renormalised() {
        // Logits [1, 3, 2, 0], k = 2, T = 1: tokens 1 and 2 with p = 1/(1+e^-1), e^-1/(1+e^-1).
        let mut sm = Sampler::new(&sampling(1.0, 2, 1.0), 4).unwrap();
        let d = sm.distribution(&[1.0, 3.0, 2.0, 0.0]).unwrap();
        let p1 = 1.0 / (1.0 + (-1.0f64).exp());
        close(&d, &[(1, p1), (2, 1.0 - p1)]);
        // T = 0.5 doubles the gap: p = 1/(1+e^-2).
        let mut sm = Sampler::new(&sampling(0.5, 2, 1.0), 4).unwrap();
        let d = sm.distribution(&[1.0, 3.0, 2.0, 0.0]).unwrap();
        let p1 = 1.0 / (1.0 + (-2.0f64).exp());
        close(&d, &[(1, p1), (2, 1.0 - p1)]);
        // Ties at the cut keep the lower id.
        let mut sm = Sampler::new(&sampling(1.0, 2, 1.0), 4).unwrap();
        let d = sm.distribution(&[0.0, 5.0, 1.0, 1.0]).unwrap();
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        // k >= vocab keeps everything.
        let mut sm = Sampler::new(&sampling(1.0, 9, 1.0), 3).unwrap();
        assert_eq!(sm.distribution(&[0.0, 1.0, 2.0]).unwrap().len(), 3);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities 0.5, 0.3, 0.15, 0.05 (as log-probabilities, T = 1).
        let probs = [0.15f64, 0.5, 0.05, 0.3];
        let l: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        let run = |p: f64| {
            let mut sm = Sampler::new(&sampling(1.0, 0, p), 4).unwrap();
            sm.distribution(&l).unwrap()
        };
        close(&run(0.4), &[(1, 1.0)]);
        close(&run(0.75), &[(1, 0.5 / 0.8), (3, 0.3 / 0.8)]);
        close(
            &run(0.85),
            &[(1, 0.5 / 0.95), (3, 0.3 / 0.95), (0, 0.15 / 0.95)],
        );
        // top-k first, then top-p within the k.
        let mut sm = Sampler::new(&sampling(1.0, 2, 0.9), 4).unwrap();
        close(
            &sm.distribution(&l).unwrap(),
            &[(1, 0.5 / 0.8), (3, 0.3 / 0.8)],
        );
    }

    #[test]
    fn draws_follow_the_filtered_distribution_and_repeat_per_seed() {
        let l = [0.3f32, 2.0, -1.0, 1.7, 0.9, 2.2];
        let s = Sampling {
            temperature: 0.8,
            top_k: 3,
            top_p: 1.0,
            seed: 17,
            ..Sampling::default()
        };
        let draw = |s: &Sampling| {
            let mut sm = Sampler::new(s, 6).unwrap();
            (0..400)
                .map(|_| sm.sample(&mut l.clone()).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draw(&s);
        assert_eq!(a, draw(&s), "same seed, same draws");
        assert_ne!(
            a,
            draw(&Sampling {
                seed: 18,
                ..s.clone()
            })
        );
        assert!(a.iter().all(|t| [5, 1, 3].contains(t)), "outside top-3");
        for t in [5, 1, 3] {
            assert!(a.contains(&t), "token {t} never drawn");
        }
    }

    #[test]
    fn bad_settings_and_nan_logits_are_errors() {
        assert!(Sampler::new(&sampling(-1.0, 0, 1.0), 4).is_err());
        assert!(Sampler::new(&sampling(1.0, 0, 0.0), 4).is_err());
        assert!(Sampler::new(&sampling(1.0, 0, 1.5), 4).is_err());
        let mut sm = Sampler::new(&sampling(1.0, 0, 1.0), 3).unwrap();
        assert!(sm.sample(&mut [0.0, f32::NAN, 1.0]).is_err());
        let mut sm = Sampler::new(&sampling(0.0, 0, 1.0), 3).unwrap();
        assert!(sm.sample(&mut [f32::NAN; 3]).is_err());
        assert!(sm.sample(&mut [0.0; 4]).is_err(), "wrong length");
    }
}
