//! Shapes of small models with a batch, for the simd tier's tests (the backward, AdamW): one
//! knob at a time varied from [`base`].

use reference::{MambaConfig, NormKind};

/// A backward case: the model's shape and the batch's.
#[derive(Clone, Debug)]
pub struct Shape {
    pub d_model: usize,
    pub expand: usize,
    pub d_state: usize,
    pub dt_rank: usize,
    pub d_conv: usize,
    pub n_layer: usize,
    pub vocab: usize,
    pub norm: NormKind,
    pub tied: bool,
    pub bias: bool,
    pub conv_bias: bool,
    pub batch: usize,
    pub seq_len: usize,
    pub resets: bool,
    pub state: bool,
}

impl Shape {
    pub fn config(&self) -> MambaConfig {
        let mut c = MambaConfig::new(self.d_model, self.n_layer, self.vocab);
        c.d_state = self.d_state;
        c.d_conv = self.d_conv;
        c.expand = self.expand;
        c.d_inner = self.expand * self.d_model;
        c.dt_rank = self.dt_rank;
        c.norm = self.norm;
        c.tie_embeddings = self.tied;
        c.use_bias = self.bias;
        c.conv_bias = self.conv_bias;
        c
    }
}

/// A small default to vary one knob at a time from.
pub fn base() -> Shape {
    Shape {
        d_model: 5,
        expand: 3,
        d_state: 3,
        dt_rank: 2,
        d_conv: 4,
        n_layer: 2,
        vocab: 13,
        norm: NormKind::Rms,
        tied: true,
        bias: false,
        conv_bias: true,
        batch: 2,
        seq_len: 9,
        resets: true,
        state: true,
    }
}
