//! Dynamic loss scaling for fp16 with DeepSpeed's semantics (`DynamicLossScaler`).
//!
//! Defaults: initial scale 2^16, window 1000, hysteresis 2, minimum scale 1, factor 2.
//! On an overflow the scale halves only once `hysteresis` overflows have been absorbed (each
//! overflow before that just uses one up); after `window` consecutive clean steps since the
//! last overflow the scale doubles and the hysteresis is restored.

use serde::{Deserialize, Serialize};

/// Settings, as in a DeepSpeed `fp16` block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaleConfig {
    pub initial_scale_power: u32,
    pub window: u64,
    pub hysteresis: u32,
    pub min_scale: f64,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        LossScaleConfig {
            initial_scale_power: 16,
            window: 1000,
            hysteresis: 2,
            min_scale: 1.0,
        }
    }
}

/// The scaler's state (saved in checkpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DynamicLossScaler {
    pub cfg: LossScaleConfig,
    pub scale: f64,
    pub cur_iter: u64,
    /// Iteration of the last overflow; `None` before the first.
    pub last_overflow_iter: Option<u64>,
    pub cur_hysteresis: u32,
}

impl DynamicLossScaler {
    pub fn new(cfg: LossScaleConfig) -> Self {
        DynamicLossScaler {
            scale: 2f64.powi(cfg.initial_scale_power as i32),
            cur_iter: 0,
            last_overflow_iter: None,
            cur_hysteresis: cfg.hysteresis,
            cfg,
        }
    }

    /// Records one step's outcome (`overflow`: a gradient was inf or NaN, the step was skipped).
    pub fn update(&mut self, overflow: bool) {
        if overflow {
            if self.cfg.hysteresis == 1 || self.cur_hysteresis == 1 {
                self.scale = (self.scale / 2.0).max(self.cfg.min_scale);
            } else {
                self.cur_hysteresis -= 1;
            }
            self.last_overflow_iter = Some(self.cur_iter);
        } else {
            // DeepSpeed: (cur_iter - last_overflow_iter) % window == 0, last_overflow_iter = -1 at start.
            let since = match self.last_overflow_iter {
                Some(l) => self.cur_iter - l,
                None => self.cur_iter + 1,
            };
            if since % self.cfg.window == 0 {
                self.cur_hysteresis = self.cfg.hysteresis;
                self.scale *= 2.0;
            }
        }
        self.cur_iter += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_2_16_and_needs_two_overflows_to_halve() {
        let mut s = DynamicLossScaler::new(LossScaleConfig::default());
        assert_eq!(s.scale, 65536.0);
        s.update(true);
        assert_eq!(s.scale, 65536.0, "first overflow is absorbed by hysteresis");
        s.update(true);
        assert_eq!(s.scale, 32768.0);
        s.update(true);
        assert_eq!(
            s.scale, 16384.0,
            "hysteresis stays used up until the scale grows again"
        );
    }

    #[test]
    fn doubles_after_a_clean_window_and_restores_hysteresis() {
        let cfg = LossScaleConfig {
            window: 4,
            ..LossScaleConfig::default()
        };
        let mut s = DynamicLossScaler::new(cfg);
        s.update(true); // iter 0: absorbed
        s.update(true); // iter 1: halve to 32768, last overflow at 1
        for _ in 0..3 {
            s.update(false); // iters 2, 3, 4
            assert_eq!(s.scale, 32768.0);
        }
        s.update(false); // iter 5: 5 - 1 = 4 = window
        assert_eq!(s.scale, 65536.0);
        assert_eq!(s.cur_hysteresis, 2);
    }

    #[test]
    fn never_goes_below_the_minimum() {
        let cfg = LossScaleConfig {
            initial_scale_power: 1,
            hysteresis: 1,
            ..LossScaleConfig::default()
        };
        let mut s = DynamicLossScaler::new(cfg);
        for _ in 0..5 {
            s.update(true);
        }
        assert_eq!(s.scale, 1.0);
    }

    #[test]
    fn clean_start_doubles_at_the_window_like_deepspeed() {
        // last_overflow_iter = -1 in DeepSpeed: the first doubling is at cur_iter = window - 1.
        let cfg = LossScaleConfig {
            window: 3,
            ..LossScaleConfig::default()
        };
        let mut s = DynamicLossScaler::new(cfg);
        s.update(false);
        s.update(false);
        assert_eq!(s.scale, 65536.0);
        s.update(false);
        assert_eq!(s.scale, 131072.0);
    }
}
