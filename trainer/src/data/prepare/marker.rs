//! Done-markers (`unit-UUUUUU.json`): what a finished unit wrote, so a re-run can keep it and
//! the manifest can be assembled from all units, on one machine or several.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::manifest::{ShardEntry, Skipped, Split};
use crate::data::shard::Shard;

/// Bad-input examples kept per unit and in the manifest.
pub const MAX_EXAMPLES: usize = 20;

/// One skipped record: the line inside the unit (1-based, when there is one) and the problem.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SkipNote {
    pub line: Option<u64>,
    pub what: String,
}

/// The done-marker of one unit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnitMarker {
    pub unit: usize,
    /// Hash of the options, the unit's source range and the input's state (see
    /// `fingerprint.rs`); a mismatch means "redo".
    pub fingerprint: String,
    pub source: String,
    pub start: u64,
    pub end: u64,
    /// Input bytes the unit covers (compressed bytes for compressed files).
    pub source_bytes: u64,
    /// Lines that start in the unit (to number lines across a file's units).
    pub lines: u64,
    pub train: Vec<ShardEntry>,
    pub val: Vec<ShardEntry>,
    /// Documents (a document split over shards counts once here).
    pub train_docs: u64,
    pub val_docs: u64,
    pub skipped: u64,
    pub skipped_examples: Vec<SkipNote>,
}

impl UnitMarker {
    pub fn tokens(&self) -> (u64, u64) {
        let sum = |v: &[ShardEntry]| v.iter().map(|e| e.tokens).sum();
        (sum(&self.train), sum(&self.val))
    }
}

/// File name of unit `unit`'s marker.
pub fn marker_name(unit: usize) -> String {
    format!("unit-{unit:06}.json")
}

/// Whether unit `unit` has a marker in `dir` (valid or not).
pub fn exists(dir: &Path, unit: usize) -> bool {
    dir.join(marker_name(unit)).exists()
}

/// Writes the marker atomically (after the unit's shards).
pub fn save(dir: &Path, m: &UnitMarker) -> Result<()> {
    let path = dir.join(marker_name(m.unit));
    let text = serde_json::to_string_pretty(m)?;
    reference::fs::atomic_write(&path, text.as_bytes())
        .with_context(|| format!("writing {} (is the disk full?)", path.display()))
}

/// Reads unit `unit`'s marker and checks it against `fingerprint` and its shards' headers
/// and sizes, and for a `strict` run that its unit skipped no record; `Err` says why it cannot
/// be kept.
pub fn load_valid(
    dir: &Path,
    unit: usize,
    fingerprint: impl FnOnce() -> String,
    strict: bool,
) -> Result<UnitMarker, String> {
    let path = dir.join(marker_name(unit));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("not done".into()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let m: UnitMarker =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if m.unit != unit || m.fingerprint != fingerprint() {
        return Err(format!(
            "{} was made from other inputs or options",
            path.display()
        ));
    }
    if strict && m.skipped > 0 {
        return Err(format!(
            "{} was made without --strict and skipped {} bad records",
            path.display(),
            m.skipped
        ));
    }
    for e in m.train.iter().chain(&m.val) {
        let shard = Shard::open(&dir.join(&e.file)).map_err(|e| e.to_string())?;
        let h = &shard.header;
        if (h.n_tokens, h.n_docs, h.payload_crc32) != (e.tokens, e.docs, e.crc32) {
            return Err(format!("shard {} does not match its marker", e.file));
        }
    }
    Ok(m)
}

/// The unit a file in the output folder belongs to (`train-u…`, `val-u…`, `unit-…`, and their
/// temporary files), if any.
pub fn unit_of(name: &str) -> Option<usize> {
    let name = name.strip_prefix('.').unwrap_or(name);
    let rest = name
        .strip_prefix("train-u")
        .or_else(|| name.strip_prefix("val-u"))
        .or_else(|| name.strip_prefix("unit-"))?;
    let digits = rest.get(..6)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Removes every file of the units `redo` says, and files of kept units that their markers
/// do not list (leftover temporaries).
pub fn clean(
    dir: &Path,
    redo: impl Fn(usize) -> bool,
    kept: &BTreeMap<usize, UnitMarker>,
) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading folder {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading folder {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(unit) = unit_of(&name) else { continue };
        let stale = if let Some(m) = kept.get(&unit) {
            name != marker_name(unit) && !m.train.iter().chain(&m.val).any(|e| e.file == name)
        } else {
            redo(unit)
        };
        if stale {
            let path = entry.path();
            std::fs::remove_file(&path)
                .with_context(|| format!("removing leftover {}", path.display()))?;
        }
    }
    Ok(())
}

/// What the markers add up to.
#[derive(Debug, Default)]
pub struct Totals {
    pub train: Split,
    pub val: Split,
    pub train_docs: u64,
    pub val_docs: u64,
    pub skipped: Skipped,
}

/// Adds up `markers` (in unit order), numbering skipped lines within each file.
pub fn totals(markers: &[&UnitMarker]) -> Totals {
    let mut t = Totals::default();
    let mut file_lines: BTreeMap<&str, u64> = BTreeMap::new();
    for m in markers {
        for (split, entries) in [(&mut t.train, &m.train), (&mut t.val, &m.val)] {
            for e in entries {
                split.tokens += e.tokens;
                split.docs += e.docs;
                split.shards.push(e.clone());
            }
        }
        t.train_docs += m.train_docs;
        t.val_docs += m.val_docs;
        let base = file_lines.entry(&m.source).or_insert(0);
        t.skipped.records += m.skipped;
        for note in &m.skipped_examples {
            if t.skipped.examples.len() < MAX_EXAMPLES {
                t.skipped.examples.push(match note.line {
                    Some(l) => format!("{}:{}: {}", m.source, *base + l, note.what),
                    None => format!("{}: {}", m.source, note.what),
                });
            }
        }
        *base += m.lines;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_files_map_to_their_units() {
        assert_eq!(unit_of("train-u000012-0003.bin"), Some(12));
        assert_eq!(unit_of("val-u000007-0000.bin.tmp"), Some(7));
        assert_eq!(unit_of(".unit-000042.json.tmp-12-0"), Some(42));
        assert_eq!(unit_of("manifest.json"), None);
        assert_eq!(unit_of("unit-12.json"), None);
    }
}
