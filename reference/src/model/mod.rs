//! The whole model: embedding → `n_layer` × (norm → mixer → residual add) → `norm_f` → lm_head.

mod backward;
mod batch;
mod forward;

pub use backward::{add_scan_param_grads, backward, backward_final, concat_cols};
pub use batch::Batch;
pub use forward::{forward, step, ForwardCache, LayerCache};
