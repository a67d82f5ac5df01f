//! The model's ops, each a `_fwd` / `_bwd` pair of plain loops in one fixed order.
//!
//! Activations are batch-major, `[batch, seq_len, channels]`, flattened row-major. Backward
//! functions *accumulate* parameter gradients (`+=`) so gradient accumulation needs no copies,
//! and return input gradients fresh.

pub mod conv1d;
pub mod linear;
pub mod norm;
pub mod selective_scan;

/// Where the document that position `t` belongs to starts, for one row of reset flags.
/// `None` means the row has not been reset since position 0, so the initial state is visible.
pub fn doc_starts(resets: Option<&[bool]>, seq_len: usize) -> Vec<Option<usize>> {
    let mut out = Vec::with_capacity(seq_len);
    let mut cur = None;
    for t in 0..seq_len {
        if resets.is_some_and(|r| r[t]) {
            cur = Some(t);
        }
        out.push(cur);
    }
    out
}

/// Row `b` of a `[batch, seq_len]` flag array.
pub fn reset_row(resets: Option<&[bool]>, b: usize, seq_len: usize) -> Option<&[bool]> {
    resets.map(|r| &r[b * seq_len..(b + 1) * seq_len])
}
