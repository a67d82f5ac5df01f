//! Learning-rate schedules.
//!
//! The learning rate of optimizer step `k` (0-based: `k` steps have completed before it) is
//! the schedule evaluated at `k`, which is DeepSpeed's `last_batch_iteration` after `k` calls
//! of `scheduler.step()`.

use serde::{Deserialize, Serialize};

/// How the warm-up rises in [`Schedule::WarmupDecay`] (DeepSpeed's `warmup_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmupType {
    /// `gamma = ln(k + 1) / ln(warmup_steps)` (DeepSpeed's default).
    Log,
    /// `gamma = k / warmup_steps`.
    Linear,
}

/// A learning-rate schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Schedule {
    /// The same rate every step.
    Constant { lr: f64 },
    /// DeepSpeed `WarmupDecayLR`: warm up from `min_lr` to `max_lr` over `warmup_steps`, then
    /// decay linearly to `min_lr` (zero by default) at `total_steps`:
    /// `lr = min_lr + (max_lr − min_lr) · gamma`, `gamma = max(0, (total − k) / max(1, total − warmup))`.
    WarmupDecay {
        min_lr: f64,
        max_lr: f64,
        warmup_steps: u64,
        total_steps: u64,
        warmup_type: WarmupType,
    },
    /// Linear warm-up from 0 to `max_lr` over `warmup_steps`, then a half cosine from `max_lr`
    /// to `min_lr` at `total_steps` (and `min_lr` after).
    Cosine {
        min_lr: f64,
        max_lr: f64,
        warmup_steps: u64,
        total_steps: u64,
    },
}

impl Schedule {
    /// The learning rate for the optimizer step that follows `k` completed steps.
    pub fn lr(&self, k: u64) -> f64 {
        match *self {
            Schedule::Constant { lr } => lr,
            Schedule::WarmupDecay {
                min_lr,
                max_lr,
                warmup_steps,
                total_steps,
                warmup_type,
            } => {
                // DeepSpeed clamps the warm-up to at least 2 steps (ln(1) = 0 would divide by 0).
                let warm = warmup_steps.max(2);
                let gamma = if k < warm {
                    match warmup_type {
                        WarmupType::Log => ((k + 1) as f64).ln() / (warm as f64).ln(),
                        WarmupType::Linear => k as f64 / warm as f64,
                    }
                } else {
                    let span = (total_steps as f64 - warm as f64).max(1.0);
                    ((total_steps as f64 - k as f64) / span).max(0.0)
                };
                min_lr + (max_lr - min_lr) * gamma
            }
            Schedule::Cosine {
                min_lr,
                max_lr,
                warmup_steps,
                total_steps,
            } => {
                if k < warmup_steps {
                    max_lr * (k + 1) as f64 / warmup_steps as f64
                } else if k >= total_steps {
                    min_lr
                } else {
                    let p = (k - warmup_steps) as f64 / (total_steps - warmup_steps).max(1) as f64;
                    min_lr + 0.5 * (max_lr - min_lr) * (1.0 + (std::f64::consts::PI * p).cos())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wd(warmup_type: WarmupType) -> Schedule {
        Schedule::WarmupDecay {
            min_lr: 0.0,
            max_lr: 1e-3,
            warmup_steps: 100,
            total_steps: 1000,
            warmup_type,
        }
    }

    #[test]
    fn warmup_decay_log_matches_deepspeed_formula() {
        let s = wd(WarmupType::Log);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(9) - 1e-3 * (10f64).ln() / (100f64).ln()).abs() < 1e-15);
        assert!(
            (s.lr(99) - 1e-3).abs() < 1e-15,
            "end of warm-up reaches max: {}",
            s.lr(99)
        );
        assert!((s.lr(100) - 1e-3).abs() < 1e-15);
        assert!((s.lr(550) - 0.5e-3).abs() < 1e-15);
        assert_eq!(s.lr(1000), 0.0);
        assert_eq!(s.lr(5000), 0.0);
    }

    #[test]
    fn warmup_decay_linear_rises_linearly_then_decays_to_zero() {
        let s = wd(WarmupType::Linear);
        assert!((s.lr(50) - 0.5e-3).abs() < 1e-15);
        assert!((s.lr(325) - 0.75e-3).abs() < 1e-15);
        assert_eq!(s.lr(1000), 0.0);
    }

    #[test]
    fn cosine_warms_up_peaks_and_ends_at_min() {
        let s = Schedule::Cosine {
            min_lr: 1e-5,
            max_lr: 1e-3,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert!((s.lr(0) - 1e-4).abs() < 1e-15);
        assert!((s.lr(10) - 1e-3).abs() < 1e-15);
        assert!((s.lr(60) - (1e-5 + 0.5 * (1e-3 - 1e-5))).abs() < 1e-15);
        assert_eq!(s.lr(110), 1e-5);
        assert!(s.lr(30) > s.lr(31));
    }
}
