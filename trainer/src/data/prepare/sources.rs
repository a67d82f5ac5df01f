//! Finding input files and cutting them into work units.
//!
//! The plan is a pure function of the sorted file list, the file sizes and the unit size, so
//! every machine (and every resume) numbers the units the same way.

use std::path::PathBuf;

use anyhow::Result;

use crate::data::inputs;

pub use crate::data::inputs::{Compression, Kind};

/// An input file the plan uses.
#[derive(Clone, Debug)]
pub struct Source {
    pub path: PathBuf,
    /// Size on disk (compressed bytes for compressed files); 0 when unreadable.
    pub bytes: u64,
    pub kind: Kind,
    pub compression: Compression,
}

/// One work unit: a whole file, or the lines of an uncompressed `.jsonl` that start in
/// `start..end`.
#[derive(Clone, Debug)]
pub struct Unit {
    pub index: usize,
    /// Index into the source list.
    pub source: usize,
    pub start: u64,
    pub end: u64,
}

impl Unit {
    /// Bytes of input this unit covers (for progress and throughput).
    pub fn bytes(&self) -> u64 {
        self.end - self.start
    }
}

/// The input files `inputs` name ([`inputs::discover`]: folders walked, sorted, without
/// duplicates) with their sizes; warnings go through `warn`.
pub fn discover(inputs: &[PathBuf], warn: &mut dyn FnMut(String)) -> Result<Vec<Source>> {
    Ok(inputs::discover(inputs, warn)?
        .into_iter()
        .map(|f| Source {
            bytes: std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0),
            path: f.path,
            kind: f.kind,
            compression: f.compression,
        })
        .collect())
}

/// Cuts the sources into units: uncompressed `.jsonl` files larger than `unit_bytes` become
/// byte ranges of `unit_bytes`; everything else is one unit.
pub fn plan(sources: &[Source], unit_bytes: u64) -> Vec<Unit> {
    let unit_bytes = unit_bytes.max(1);
    let mut units = Vec::new();
    for (i, s) in sources.iter().enumerate() {
        let splittable = s.kind == Kind::Jsonl && s.compression == Compression::None;
        if splittable && s.bytes > unit_bytes {
            let mut start = 0;
            while start < s.bytes {
                let end = (start + unit_bytes).min(s.bytes);
                units.push(Unit {
                    index: units.len(),
                    source: i,
                    start,
                    end,
                });
                start = end;
            }
        } else {
            units.push(Unit {
                index: units.len(),
                source: i,
                start: 0,
                end: s.bytes,
            });
        }
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(name: &str, bytes: u64) -> Source {
        let (kind, compression) = inputs::classify(std::path::Path::new(name))
            .unwrap()
            .unwrap();
        Source {
            path: name.into(),
            bytes,
            kind,
            compression,
        }
    }

    #[test]
    fn large_plain_jsonl_is_cut_into_ranges_and_the_rest_stays_whole() {
        let sources = [src("a.jsonl", 25), src("b.jsonl.gz", 100), src("c.txt", 50)];
        let units = plan(&sources, 10);
        let ranges: Vec<_> = units.iter().map(|u| (u.source, u.start, u.end)).collect();
        assert_eq!(
            ranges,
            [
                (0, 0, 10),
                (0, 10, 20),
                (0, 20, 25),
                (1, 0, 100),
                (2, 0, 50)
            ]
        );
        assert!(units.iter().enumerate().all(|(i, u)| u.index == i));
    }
}
