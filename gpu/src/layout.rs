//! Where every parameter lives in the engine's flat f32 buffers (parameters, gradients,
//! AdamW moments and the low-precision shadow all share these offsets).

use reference::{param_specs, params::is_no_decay, MambaConfig};

/// One parameter tensor.
#[derive(Clone, Debug)]
pub struct Slot {
    pub name: String,
    pub shape: Vec<usize>,
    /// Element offset into the flat buffers.
    pub off: usize,
    pub numel: usize,
    /// AdamW decays it.
    pub decays: bool,
}

/// Offsets of one layer's tensors.
#[derive(Clone, Debug, Default)]
pub struct LayerOffs {
    pub norm_w: usize,
    pub norm_b: Option<usize>,
    pub in_w: usize,
    pub in_b: Option<usize>,
    pub conv_w: usize,
    pub conv_b: Option<usize>,
    pub x_w: usize,
    pub dt_w: usize,
    pub dt_b: usize,
    pub a_log: usize,
    pub d: usize,
    pub out_w: usize,
    pub out_b: Option<usize>,
}

/// Offsets of the whole model.
#[derive(Clone, Debug)]
pub struct Layout {
    pub slots: Vec<Slot>,
    pub numel: usize,
    pub emb: usize,
    pub layers: Vec<LayerOffs>,
    pub norm_f_w: usize,
    pub norm_f_b: Option<usize>,
    /// The lm_head weight: the untied head, or the embedding.
    pub head: usize,
}

impl Layout {
    pub fn new(cfg: &MambaConfig) -> Layout {
        let mut slots = Vec::new();
        let mut off = 0;
        for (name, shape) in param_specs(cfg) {
            let numel = shape.iter().product();
            let decays = !is_no_decay(&name);
            slots.push(Slot {
                name,
                shape,
                off,
                numel,
                decays,
            });
            off += numel;
        }
        let find = |n: &str| slots.iter().find(|s| s.name == n).map(|s| s.off);
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("backbone.layers.{i}");
            let m = format!("{p}.mixer");
            let req = |n: String| find(&n).unwrap_or(0);
            layers.push(LayerOffs {
                norm_w: req(format!("{p}.norm.weight")),
                norm_b: find(&format!("{p}.norm.bias")),
                in_w: req(format!("{m}.in_proj.weight")),
                in_b: find(&format!("{m}.in_proj.bias")),
                conv_w: req(format!("{m}.conv1d.weight")),
                conv_b: find(&format!("{m}.conv1d.bias")),
                x_w: req(format!("{m}.x_proj.weight")),
                dt_w: req(format!("{m}.dt_proj.weight")),
                dt_b: req(format!("{m}.dt_proj.bias")),
                a_log: req(format!("{m}.A_log")),
                d: req(format!("{m}.D")),
                out_w: req(format!("{m}.out_proj.weight")),
                out_b: find(&format!("{m}.out_proj.bias")),
            });
        }
        let emb = find("backbone.embeddings.weight").unwrap_or(0);
        Layout {
            numel: off,
            emb,
            layers,
            norm_f_w: find("backbone.norm_f.weight").unwrap_or(0),
            norm_f_b: find("backbone.norm_f.bias"),
            head: find("lm_head.weight").unwrap_or(emb),
            slots,
        }
    }
}
