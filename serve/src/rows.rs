//! Moving single-sequence [`State`]s in and out of one batched `State`, so that several
//! conversations, each with its own state, decode in one engine step.
//!
//! A state's tensors are `[n_layer, batch, d_inner, ...]`: row `b` of layer `i` is one
//! contiguous run, so a gather is `n_layer` copies per row.

use reference::{MambaConfig, State};

/// Fills `out` (batch `rows.len()`; reshaped if it has another batch) with `rows` (batch 1
/// each), row `b` from `rows[b]`.
pub fn gather(cfg: &MambaConfig, rows: &[&State<f32>], out: &mut State<f32>) {
    if out.batch() != rows.len() {
        *out = State::zeros(cfg, rows.len());
    }
    for (b, row) in rows.iter().enumerate() {
        debug_assert_eq!(row.batch(), 1);
        copy_rows(
            &row.conv.data,
            &mut out.conv.data,
            b,
            rows.len(),
            cfg.n_layer,
        );
        copy_rows(&row.ssm.data, &mut out.ssm.data, b, rows.len(), cfg.n_layer);
    }
}

/// Copies row `b` of `batched` into `out` (batch 1).
pub fn scatter(cfg: &MambaConfig, batched: &State<f32>, b: usize, out: &mut State<f32>) {
    debug_assert_eq!(out.batch(), 1);
    let n = batched.batch();
    let layers = cfg.n_layer;
    let conv_row = batched.conv.data.len() / (layers * n);
    let ssm_row = batched.ssm.data.len() / (layers * n);
    for i in 0..layers {
        let src = (i * n + b) * conv_row;
        out.conv.data[i * conv_row..(i + 1) * conv_row]
            .copy_from_slice(&batched.conv.data[src..src + conv_row]);
        let src = (i * n + b) * ssm_row;
        out.ssm.data[i * ssm_row..(i + 1) * ssm_row]
            .copy_from_slice(&batched.ssm.data[src..src + ssm_row]);
    }
}

/// Copies the one row of `src` (batch 1) into row `b` of `dst` (batch `n`), layer by layer.
fn copy_rows(src: &[f32], dst: &mut [f32], b: usize, n: usize, layers: usize) {
    let row = src.len() / layers;
    for i in 0..layers {
        let at = (i * n + b) * row;
        dst[at..at + row].copy_from_slice(&src[i * row..(i + 1) * row]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reference::rng::Rng;

    fn random_state(cfg: &MambaConfig, seed: u64) -> State<f32> {
        let mut rng = Rng::new(seed);
        let mut s = State::zeros(cfg, 1);
        for v in s.conv.data.iter_mut().chain(s.ssm.data.iter_mut()) {
            *v = rng.next_f64() as f32 - 0.5;
        }
        s
    }

    #[test]
    fn gather_then_scatter_gives_every_row_back_in_its_place() {
        let cfg = MambaConfig::load(&fixtures::tiny_checkpoint().join("config.json")).unwrap();
        let rows: Vec<State<f32>> = (0..3).map(|s| random_state(&cfg, 40 + s)).collect();
        let mut batched = State::zeros(&cfg, 1);
        gather(&cfg, &rows.iter().collect::<Vec<_>>(), &mut batched);
        assert_eq!(batched.batch(), 3);
        // Row 1 of layer 0 starts after row 0's conv window.
        let conv_row = rows[0].conv.data.len() / cfg.n_layer;
        assert_eq!(
            batched.conv.data[conv_row..2 * conv_row],
            rows[1].conv.data[..conv_row]
        );
        for (b, want) in rows.iter().enumerate() {
            let mut got = State::zeros(&cfg, 1);
            scatter(&cfg, &batched, b, &mut got);
            assert_eq!(got.conv.data, want.conv.data, "conv row {b}");
            assert_eq!(got.ssm.data, want.ssm.data, "ssm row {b}");
        }
    }
}
