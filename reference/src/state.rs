//! Recurrent state carried between calls: the conv window and the SSM state of every layer.

use crate::config::MambaConfig;
use crate::float::Float;
use crate::tensor::Tensor;

/// The state after a token: what a later call needs to continue the same sequences.
///
/// `conv` holds, per layer, the last `d_conv - 1` conv inputs (x before the conv) in position
/// order, oldest first: `[n_layer, batch, d_inner, d_conv - 1]`. `ssm` holds `h`:
/// `[n_layer, batch, d_inner, d_state]`.
#[derive(Clone, Debug, PartialEq)]
pub struct State<T> {
    pub conv: Tensor<T>,
    pub ssm: Tensor<T>,
}

impl<T: Float> State<T> {
    /// The all-zero state: what a sequence starts from.
    pub fn zeros(cfg: &MambaConfig, batch: usize) -> Self {
        State {
            conv: Tensor::zeros(&[cfg.n_layer, batch, cfg.d_inner, cfg.d_conv - 1]),
            ssm: Tensor::zeros(&[cfg.n_layer, batch, cfg.d_inner, cfg.d_state]),
        }
    }

    pub fn batch(&self) -> usize {
        self.ssm.shape[1]
    }

    /// Layer `i`'s conv window, `[batch, d_inner, d_conv - 1]`.
    pub fn conv_layer(&self, i: usize) -> &[T] {
        let n = self.conv.numel() / self.conv.shape[0];
        &self.conv.data[i * n..(i + 1) * n]
    }

    /// Layer `i`'s SSM state, `[batch, d_inner, d_state]`.
    pub fn ssm_layer(&self, i: usize) -> &[T] {
        let n = self.ssm.numel() / self.ssm.shape[0];
        &self.ssm.data[i * n..(i + 1) * n]
    }

    pub fn conv_layer_mut(&mut self, i: usize) -> &mut [T] {
        let n = self.conv.numel() / self.conv.shape[0];
        &mut self.conv.data[i * n..(i + 1) * n]
    }

    pub fn ssm_layer_mut(&mut self, i: usize) -> &mut [T] {
        let n = self.ssm.numel() / self.ssm.shape[0];
        &mut self.ssm.data[i * n..(i + 1) * n]
    }

    /// Converts every element (f32 <-> f64).
    pub fn cast<U: Float>(&self) -> State<U> {
        State {
            conv: self.conv.cast(),
            ssm: self.ssm.cast(),
        }
    }

    /// Checks the shape against `cfg` and `batch`.
    pub fn check(&self, cfg: &MambaConfig, batch: usize, op: &'static str) -> crate::Result<()> {
        let want_conv = [cfg.n_layer, batch, cfg.d_inner, cfg.d_conv - 1];
        let want_ssm = [cfg.n_layer, batch, cfg.d_inner, cfg.d_state];
        if self.conv.shape != want_conv || self.ssm.shape != want_ssm {
            return Err(crate::Error::Shape {
                op,
                msg: format!(
                    "state is conv {:?} / ssm {:?}, expected [n_layer, batch, d_inner, d_conv - 1] = {:?} / [n_layer, batch, d_inner, d_state] = {:?}",
                    self.conv.shape, self.ssm.shape, want_conv, want_ssm
                ),
            });
        }
        Ok(())
    }
}
