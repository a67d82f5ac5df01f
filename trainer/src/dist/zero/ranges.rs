//! Flat-range bookkeeping over a [`FlatLayout`]: the range each rank's optimizer owns, the
//! flat ranges of each parameter group, and each rank's part of a range.

use std::ops::Range;

use reference::engine::ParamGroup;

use crate::dist::shard::FlatLayout;

/// The flat range the optimizer of `rank` owns at `stage` and its decay runs (relative to
/// the range's start).
pub fn owned(
    layout: &FlatLayout,
    stage: u8,
    rank: usize,
) -> (Range<usize>, Vec<(Range<usize>, bool)>) {
    if stage == 0 {
        let one = FlatLayout {
            world: 1,
            chunk: layout.numel,
            ..layout.clone()
        };
        (0..layout.numel, one.decay_runs(0))
    } else {
        (layout.chunk_range(rank), layout.decay_runs(rank))
    }
}

/// The flat ranges of each [`ParamGroup`] of `cfg` (the layers in order, then the outer
/// group), adjacent tensors merged.
pub(super) fn group_ranges(
    cfg: &reference::MambaConfig,
    layout: &FlatLayout,
) -> Vec<Vec<Range<usize>>> {
    ParamGroup::all(cfg)
        .into_iter()
        .map(|g| {
            let mut out: Vec<Range<usize>> = Vec::new();
            for i in g.tensors(cfg) {
                let f = layout.slots[i].flat.clone();
                match out.last_mut() {
                    Some(last) if last.end == f.start => last.end = f.end,
                    _ => out.push(f),
                }
            }
            out
        })
        .collect()
}

/// Each rank's part of the flat range `r` (inside its chunk) and the longest part.
pub(super) fn parts(layout: &FlatLayout, r: &Range<usize>) -> (Vec<Range<usize>>, usize) {
    {
        let c = layout.chunk;
        let parts: Vec<Range<usize>> = (0..layout.world)
            .map(|q| {
                let (lo, hi) = (r.start.max(q * c), r.end.min((q + 1) * c));
                // An empty part sits at the chunk's start.
                if lo < hi {
                    lo..hi
                } else {
                    q * c..q * c
                }
            })
            .collect();
        let n = parts.iter().map(|p| p.len()).max().unwrap_or(0);
        (parts, n)
    }
}

/// Whether the parts of a range are so uneven (the longest `n` of `world`) that one
/// collective padding every part to the longest would stage more than twice the range: then
/// each owner's part moves on its own (a broadcast of the parameters, an all-reduce of the
/// gradient), staging one part at a time.
pub(super) fn lopsided(world: usize, n: usize, r: &Range<usize>) -> bool {
    world * n > 2 * r.len()
}
