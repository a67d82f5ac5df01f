//! The training loop's parts: schedules, fp16 loss scaling.

pub mod deepspeed;
pub mod loss_scale;
pub mod run_config;
pub mod schedule;
