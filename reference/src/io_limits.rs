//! Sanity limits for reading checkpoints: sizes checked against the file before anything big
//! is built, and problem lists capped, so an absurd config (`num_hidden_layers: 100000`) or a
//! header claiming a huge tensor gives a short error naming the sizes, not a listing of a
//! million missing tensors.

use std::path::Path;

use crate::config::{MambaConfig, NormKind};
use crate::error::Error;

/// Most items a problem list shows before "… and N more".
pub const MAX_LISTED: usize = 8;

/// `items` joined by `sep`, at most [`MAX_LISTED`] of them, then "… and N more".
pub fn capped_list(items: &[String], sep: &str) -> String {
    let shown = items[..items.len().min(MAX_LISTED)].join(sep);
    match items.len().saturating_sub(MAX_LISTED) {
        0 => shown,
        more => format!("{shown}{sep}… and {more} more"),
    }
}

/// The number of parameters `cfg` describes (as [`crate::param_specs`] lists them), computed
/// without building the list; saturates at `u128::MAX` (no size is that large).
pub fn param_count(cfg: &MambaConfig) -> u128 {
    let (dm, di, ds, dc, r, v) = (
        cfg.d_model as u128,
        cfg.d_inner as u128,
        cfg.d_state as u128,
        cfg.d_conv as u128,
        cfg.dt_rank as u128,
        cfg.vocab_size as u128,
    );
    let m = |a: u128, b: u128| a.saturating_mul(b);
    let sum = |terms: &[u128]| terms.iter().fold(0u128, |a, &t| a.saturating_add(t));
    let (ln, bias, conv_bias) = (
        u128::from(cfg.norm == NormKind::Layer),
        u128::from(cfg.use_bias),
        u128::from(cfg.conv_bias),
    );
    let layer = sum(&[
        m(dm, 1 + ln),
        m(m(2, di), dm),
        m(bias, sum(&[m(2, di), dm])),
        m(di, dc),
        m(conv_bias, di),
        m(sum(&[r, m(2, ds)]), di),
        m(di, r),
        m(2, di),
        m(di, ds),
        m(dm, di),
    ]);
    let embeddings = m(v, dm);
    let head = if cfg.tie_embeddings { 0 } else { embeddings };
    sum(&[
        m(cfg.n_layer as u128, layer),
        embeddings,
        head,
        m(dm, 1 + ln),
    ])
}

/// Refuses a config whose parameters cannot fit in `data_len` bytes of tensor data at
/// `min_bits` per parameter (16 for a float checkpoint, 8 for int8 codes, 4 for int4), before a
/// list of its tensors is built.
pub fn check_fits(
    path: &Path,
    cfg: &MambaConfig,
    data_len: u64,
    min_bits: u64,
) -> Result<(), Error> {
    let n = param_count(cfg);
    let need = n.saturating_mul(min_bits as u128).div_ceil(8);
    if need <= data_len as u128 {
        return Ok(());
    }
    let described = format!("{n} parameters (at least {need} bytes)");
    Err(Error::Checkpoint {
        path: path.display().to_string(),
        msg: format!(
            "the config ({} layers, d_model {}, vocab_size {}) describes {described}, but the \
             file holds {data_len} bytes of tensor data: config.json and the weights do not \
             belong together",
            cfg.n_layer, cfg.d_model, cfg.vocab_size
        ),
    })
}

/// Bytes per element of a safetensors dtype name (`None` for an unknown one).
fn dtype_bytes(dtype: &str) -> Option<u128> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

/// When the header could not be read as safetensors, a clearer reason if one tensor claims
/// more bytes than the file's `data_len` bytes of tensor data: its size against the file's.
pub fn explain_header(header: &[u8], data_len: u64) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    for (name, t) in v.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let dtype = t.get("dtype")?.as_str()?;
        let shape: Vec<u128> = t
            .get("shape")?
            .as_array()?
            .iter()
            .map(|d| d.as_u64().map(u128::from))
            .collect::<Option<_>>()?;
        let elements = shape.iter().try_fold(1u128, |a, &d| a.checked_mul(d));
        let bytes = elements.and_then(|n| n.checked_mul(dtype_bytes(dtype)?));
        let offsets = t.get("data_offsets")?;
        let start = offsets.get(0)?.as_u64()?;
        let end = offsets.get(1)?.as_u64()?;
        let too_big = |b: Option<u128>| b.is_none_or(|b| b > data_len as u128);
        if too_big(bytes) || too_big(Some(end as u128)) {
            let size = bytes.map_or("more bytes than can be counted".into(), |b| {
                format!("{b} bytes")
            });
            return Some(format!(
                "tensor `{name}` ({dtype} {shape:?}, {size}) at data offsets {start}..{end}, but the file holds only {data_len} bytes of tensor data (truncated or corrupt file)"
            ));
        }
    }
    None
}
