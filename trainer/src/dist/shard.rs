//! Flat sharding, as DeepSpeed's ZeRO does it: every parameter in canonical order
//! ([`param_specs`]) laid end to end in one vector, padded with zeros to a multiple of the
//! world size, and rank `r` owning chunk `r` (`[r·c, (r+1)·c)`, `c = padded / world`). A
//! chunk may start or end inside a tensor; the padding sits at the end of the last chunk.

use std::ops::Range;

use reference::engine::NamedTensors;
use reference::params::{is_no_decay, param_specs};
use reference::tensor::Tensor;
use reference::MambaConfig;

use super::DistError;

/// Where one tensor's elements lie in the flat vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Slot {
    pub name: String,
    pub shape: Vec<usize>,
    /// Flat indices of the tensor's elements.
    pub flat: Range<usize>,
}

/// The part of one tensor that falls into a flat range.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    /// Index into [`FlatLayout::slots`] (canonical order).
    pub tensor: usize,
    /// Element range inside the tensor.
    pub in_tensor: Range<usize>,
    /// The same elements' flat indices.
    pub flat: Range<usize>,
}

/// The flat layout of a model's parameters over `world` ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatLayout {
    pub slots: Vec<Slot>,
    /// Parameter elements (without padding).
    pub numel: usize,
    pub world: usize,
    /// Elements per rank: `ceil(numel / world)`.
    pub chunk: usize,
}

impl FlatLayout {
    /// The layout of `cfg`'s parameters over `world` ranks (`world ≥ 1`).
    pub fn new(cfg: &MambaConfig, world: usize) -> FlatLayout {
        let specs = param_specs(cfg);
        Self::from_shapes(specs, world)
    }

    /// The layout of named shapes in the given order (tests use odd sizes).
    pub fn from_shapes(specs: Vec<(String, Vec<usize>)>, world: usize) -> FlatLayout {
        let world = world.max(1);
        let mut at = 0;
        let slots = specs
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let s = Slot {
                    name,
                    shape,
                    flat: at..at + n,
                };
                at += n;
                s
            })
            .collect();
        FlatLayout {
            slots,
            numel: at,
            world,
            chunk: at.div_ceil(world),
        }
    }

    /// `numel` rounded up to a multiple of the world size.
    pub fn padded(&self) -> usize {
        self.chunk * self.world
    }

    /// The flat range rank `rank` owns, padding included.
    pub fn chunk_range(&self, rank: usize) -> Range<usize> {
        rank * self.chunk..(rank + 1) * self.chunk
    }

    /// The part of rank `rank`'s chunk that holds parameters (no padding); may be empty.
    pub fn owned(&self, rank: usize) -> Range<usize> {
        let c = self.chunk_range(rank);
        c.start.min(self.numel)..c.end.min(self.numel)
    }

    /// The tensors (or parts of them) that lie in the flat range `r`, in order.
    pub fn pieces(&self, r: Range<usize>) -> Vec<Piece> {
        let mut out = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let lo = s.flat.start.max(r.start);
            let hi = s.flat.end.min(r.end);
            if lo < hi {
                out.push(Piece {
                    tensor: i,
                    in_tensor: lo - s.flat.start..hi - s.flat.start,
                    flat: lo..hi,
                });
            }
        }
        out
    }

    /// Runs of rank `rank`'s chunk (indices relative to the chunk start) and whether AdamW
    /// decays them (`A_log`, `D`, biases and norm weights never decay); padding is left out.
    pub fn decay_runs(&self, rank: usize) -> Vec<(Range<usize>, bool)> {
        let base = self.chunk_range(rank).start;
        self.pieces(self.owned(rank))
            .into_iter()
            .map(|p| {
                let decays = !is_no_decay(&self.slots[p.tensor].name);
                (p.flat.start - base..p.flat.end - base, decays)
            })
            .collect()
    }

    /// Named tensors (checked against the layout) laid end to end, padded with zeros.
    pub fn flatten(&self, named: &[(String, Tensor<f32>)]) -> Result<Vec<f32>, DistError> {
        let mut flat = vec![0.0f32; self.padded()];
        self.flatten_into(named, &mut flat)?;
        Ok(flat)
    }

    /// [`FlatLayout::flatten`] into a caller's buffer of `padded()` elements.
    pub fn flatten_into(
        &self,
        named: &[(String, Tensor<f32>)],
        flat: &mut [f32],
    ) -> Result<(), DistError> {
        self.check(named)?;
        for (s, (_, t)) in self.slots.iter().zip(named) {
            flat[s.flat.clone()].copy_from_slice(&t.data);
        }
        flat[self.numel..].iter_mut().for_each(|x| *x = 0.0);
        Ok(())
    }

    /// Named tensors from a flat vector (of at least `numel` elements).
    pub fn unflatten(&self, flat: &[f32]) -> NamedTensors {
        self.slots
            .iter()
            .map(|s| {
                let t = Tensor::from_vec(&s.shape, flat[s.flat.clone()].to_vec());
                (s.name.clone(), t)
            })
            .collect()
    }

    /// An error unless `named` has the layout's names and shapes in its order.
    pub(crate) fn check(&self, named: &[(String, Tensor<f32>)]) -> Result<(), DistError> {
        let ok = named.len() == self.slots.len()
            && self
                .slots
                .iter()
                .zip(named)
                .all(|(s, (n, t))| &s.name == n && s.shape == t.shape);
        if !ok {
            let first_bad = self
                .slots
                .iter()
                .zip(named)
                .find(|(s, (n, t))| &s.name != n || s.shape != t.shape)
                .map(|(s, (n, t))| {
                    format!("expected {} {:?}, got {n} {:?}", s.name, s.shape, t.shape)
                })
                .unwrap_or_default();
            return Err(DistError::Layout(format!(
                "{} tensors for a layout of {}: {first_bad}",
                named.len(),
                self.slots.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn odd() -> Vec<(String, Vec<usize>)> {
        vec![
            ("a.weight".into(), vec![3, 2]),
            ("b.bias".into(), vec![5]),
            ("c.weight".into(), vec![7]),
        ]
    }

    #[test]
    fn chunks_cover_the_parameters_once_and_pad_at_the_end() {
        for world in 1..=7 {
            let l = FlatLayout::from_shapes(odd(), world);
            assert_eq!(l.numel, 18);
            assert_eq!(l.padded() % world, 0);
            assert!(l.padded() >= 18 && l.padded() < 18 + world);
            let mut covered = Vec::new();
            for r in 0..world {
                covered.extend(l.owned(r));
                assert_eq!(l.chunk_range(r).len(), l.chunk);
            }
            assert_eq!(covered, (0..18).collect::<Vec<_>>(), "world {world}");
        }
    }

    #[test]
    fn which_rank_owns_which_slice_at_world_4() {
        // 18 elements over 4 ranks: chunks of 5, padding of 2 on rank 3.
        let l = FlatLayout::from_shapes(odd(), 4);
        assert_eq!(l.chunk, 5);
        assert_eq!(l.owned(0), 0..5);
        assert_eq!(l.owned(3), 15..18);
        // Rank 1 owns a's last element and b's first four: it starts inside a tensor.
        let p = l.pieces(l.owned(1));
        assert_eq!(
            p,
            vec![
                Piece {
                    tensor: 0,
                    in_tensor: 5..6,
                    flat: 5..6
                },
                Piece {
                    tensor: 1,
                    in_tensor: 0..4,
                    flat: 6..10
                },
            ]
        );
        // Decay: a.weight decays, b.bias does not; runs are relative to the chunk.
        assert_eq!(l.decay_runs(1), vec![(0..1, true), (1..5, false)]);
        assert_eq!(l.decay_runs(3), vec![(0..3, true)]);
    }

    #[test]
    fn more_ranks_than_elements_leave_empty_chunks() {
        let l = FlatLayout::from_shapes(vec![("x.weight".into(), vec![2])], 3);
        assert_eq!(l.chunk, 1);
        assert_eq!(l.owned(2), 2..2);
        assert!(l.decay_runs(2).is_empty());
    }

    #[test]
    fn flatten_and_unflatten_round_trip() {
        let l = FlatLayout::from_shapes(odd(), 4);
        let named: NamedTensors = odd()
            .into_iter()
            .enumerate()
            .map(|(i, (n, s))| {
                let k: usize = s.iter().product();
                let v = (0..k).map(|j| (i * 100 + j) as f32 + 0.25).collect();
                (n, Tensor::from_vec(&s, v))
            })
            .collect();
        let flat = l.flatten(&named).unwrap();
        assert_eq!(flat.len(), 20);
        assert_eq!(flat[6], 100.25);
        assert_eq!(&flat[18..], &[0.0, 0.0]);
        assert_eq!(l.unflatten(&flat), named);
        let mut wrong = named.clone();
        wrong.swap(0, 1);
        assert!(l.flatten(&wrong).is_err());
    }
}
