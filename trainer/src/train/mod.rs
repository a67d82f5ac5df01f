//! The training loop's parts: schedules, fp16 loss scaling.

pub mod carry;
pub mod deepspeed;
pub mod eval;
pub mod evaluate;
pub mod long_eval;
pub mod loss_scale;
pub mod plot;
pub mod qa_eval;
pub mod resume;
pub mod run;
pub mod run_config;
pub mod schedule;
mod setup;
pub mod source;
pub mod state;
