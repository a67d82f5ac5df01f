//! The buckets of a streamed step: the [`Packer`] hook that packs each group's gradient into
//! buckets as the backward hands it over, and the [`Reducer`] that sums each bucket over the
//! ranks (in line, or on the communication thread of [`stream`](super::streamed::stream)).

use std::ops::Range;
use std::sync::mpsc;
use std::time::Instant;

use reference::comm::{Comm, CommResult};
use reference::engine::{GradHook, ParamGroup};
use reference::Tensor;

use super::CommRecord;
use crate::dist::shard::FlatLayout;

/// Gradients packed for one collective: flat ranges and their values, end to end.
#[derive(Default)]
pub(super) struct Bucket {
    ranges: Vec<Range<usize>>,
    values: Vec<f32>,
}

/// Where a full bucket goes: reduced in line, or sent to the communication thread.
pub(super) enum Sink<'a> {
    Inline(Reducer<'a>),
    Thread(mpsc::Sender<Bucket>),
}

/// The [`GradHook`] of a streamed step: packs each group's gradient, as the engine hands it
/// over, into the current bucket. A group goes into the bucket whole; the bucket is sent
/// before a group that would take it past `bucket` elements, and as soon as it holds
/// `bucket` or more (so a group larger than the bucket size is a bucket by itself). The last
/// bucket is sent by [`Packer::finish`].
pub(super) struct Packer<'a> {
    pub(super) groups: &'a [Vec<Range<usize>>],
    pub(super) sizes: &'a [usize],
    pub(super) bucket: usize,
    pub(super) cur: Bucket,
    /// Groups handed over this call.
    pub(super) seen: Vec<bool>,
    pub(super) sink: Sink<'a>,
}

impl Packer<'_> {
    fn send(&mut self) -> reference::Result<()> {
        if self.cur.values.is_empty() {
            return Ok(());
        }
        let b = std::mem::take(&mut self.cur);
        match &mut self.sink {
            Sink::Inline(r) => r.reduce(b)?,
            Sink::Thread(tx) => tx.send(b).map_err(|_| reference::Error::Device {
                device: "communication thread".into(),
                msg: "it stopped (a collective failed)".into(),
            })?,
        }
        Ok(())
    }

    /// Sends the last bucket, after checking that every group came.
    pub(super) fn finish(&mut self) -> reference::Result<()> {
        if let Some(i) = self.seen.iter().position(|s| !s) {
            return Err(reference::Error::Shape {
                op: "streamed backward",
                msg: format!("group {i} of {} was never handed over", self.seen.len()),
            });
        }
        self.send()
    }
}

impl GradHook for Packer<'_> {
    fn gradients(&mut self, g: ParamGroup, grads: &[&Tensor<f32>]) -> reference::Result<()> {
        let idx = g.index(self.groups.len() - 1);
        let want = self.sizes.get(idx).copied();
        let got: usize = grads.iter().map(|t| t.numel()).sum();
        if want != Some(got)
            || self.seen[idx]
            || (g != ParamGroup::Outer && idx + 1 >= self.groups.len())
        {
            return Err(reference::Error::Shape {
                op: "streamed backward",
                msg: format!(
                    "{g:?}: {got} elements (the layout has {want:?}), or handed over twice"
                ),
            });
        }
        self.seen[idx] = true;
        if !self.cur.values.is_empty() && self.cur.values.len() + got > self.bucket {
            self.send()?;
        }
        self.cur.ranges.extend(self.groups[idx].iter().cloned());
        for t in grads {
            self.cur.values.extend_from_slice(&t.data);
        }
        if self.cur.values.len() >= self.bucket {
            self.send()?;
        }
        Ok(())
    }
}

/// Sums buckets over the ranks into `dest`: all-reduce, the sums copied to their flat
/// ranges of the padded flat buffer; or (`scatter`, stage 2) each rank's part of the bucket
/// (its elements inside the rank's chunk) padded to the longest part and reduce-scattered, so
/// this rank keeps the sums of its part, in its chunk. Where that padding would move more
/// than twice the bucket (a bucket inside one or two chunks of a large world) the bucket is
/// all-reduced instead and this rank keeps its part. Either way each element is the
/// rank-order sum of the ranks' values: the bits of the whole-model path.
pub(super) struct Reducer<'a> {
    pub(super) comm: &'a mut dyn Comm,
    pub(super) layout: &'a FlatLayout,
    pub(super) scatter: bool,
    pub(super) dest: &'a mut [f32],
    pub(super) log: Vec<CommRecord>,
    /// When each collective started and ended.
    pub(super) spans: Vec<(Instant, Instant)>,
}

impl Reducer<'_> {
    fn record(&mut self, op: &'static str, bytes: usize, start: Instant) {
        let end = Instant::now();
        let secs = (end - start).as_secs_f64();
        self.log.push(CommRecord { op, bytes, secs });
        self.spans.push((start, end));
    }

    pub(super) fn reduce(&mut self, b: Bucket) -> CommResult<()> {
        let Bucket { ranges, mut values } = b;
        if !self.scatter {
            let start = Instant::now();
            self.comm.all_reduce_sum(&mut values)?;
            self.record("all_reduce", 4 * values.len(), start);
            let mut at = 0;
            for r in ranges {
                self.dest[r.clone()].copy_from_slice(&values[at..at + r.len()]);
                at += r.len();
            }
            return Ok(());
        }
        let (w, c, me) = (self.layout.world, self.layout.chunk, self.comm.rank());
        // Each rank's part: (offset in the bucket, flat range) of its elements, in order.
        let mut parts: Vec<Vec<(usize, Range<usize>)>> = vec![Vec::new(); w];
        let mut at = 0;
        for r in &ranges {
            let mut lo = r.start;
            while lo < r.end {
                let q = lo / c;
                let hi = r.end.min((q + 1) * c);
                parts[q].push((at + lo - r.start, lo..hi));
                lo = hi;
            }
            at += r.len();
        }
        let len = |p: &[(usize, Range<usize>)]| p.iter().map(|s| s.1.len()).sum::<usize>();
        let n = parts.iter().map(|p| len(p)).max().unwrap_or(0);
        let base = me * c;
        let start = Instant::now();
        if w * n > 2 * values.len() {
            self.comm.all_reduce_sum(&mut values)?;
            self.record("all_reduce", 4 * values.len(), start);
            for (off, f) in &parts[me] {
                self.dest[f.start - base..f.end - base]
                    .copy_from_slice(&values[*off..*off + f.len()]);
            }
            return Ok(());
        }
        // At world size 1 the one part is the whole bucket, in order: the values themselves.
        let staged;
        let input: &[f32] = if w == 1 {
            debug_assert_eq!(n, values.len());
            &values
        } else {
            let mut input = vec![0.0f32; w * n];
            for (q, p) in parts.iter().enumerate() {
                let mut k = q * n;
                for (off, f) in p {
                    input[k..k + f.len()].copy_from_slice(&values[*off..*off + f.len()]);
                    k += f.len();
                }
            }
            staged = input;
            &staged
        };
        let mut out = vec![0.0f32; n];
        self.comm.reduce_scatter_sum(input, &mut out)?;
        self.record("reduce_scatter", 4 * input.len(), start);
        let mut k = 0;
        for (_, f) in &parts[me] {
            self.dest[f.start - base..f.end - base].copy_from_slice(&out[k..k + f.len()]);
            k += f.len();
        }
        Ok(())
    }
}
