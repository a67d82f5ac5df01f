//! Finding input files and cutting them into work units.
//!
//! The plan is a pure function of the sorted file list, the file sizes and the unit size, so
//! every machine (and every resume) numbers the units the same way.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// How a file's bytes are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// What a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// One JSON object per line, the document in a string field.
    Jsonl,
    /// The whole file is one document.
    Txt,
}

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

/// Classifies a path by its extension; `Ok(None)` for extensions `prepare` does not read.
pub fn classify(path: &Path) -> Result<Option<(Kind, Compression)>> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let (stem, compression) = if let Some(s) = name.strip_suffix(".gz") {
        (s, Compression::Gzip)
    } else if let Some(s) = name.strip_suffix(".zst") {
        (s, Compression::Zstd)
    } else if let Some(s) = name.strip_suffix(".zstd") {
        (s, Compression::Zstd)
    } else {
        (name.as_str(), Compression::None)
    };
    if stem.ends_with(".parquet") {
        bail!(
            "{}: Parquet is not supported; convert it to JSON Lines first (for example with \
             `python -c \"import pandas as pd; pd.read_parquet('x.parquet').to_json('x.jsonl', orient='records', lines=True)\"`)",
            path.display()
        );
    }
    Ok(if stem.ends_with(".jsonl") {
        Some((Kind::Jsonl, compression))
    } else if stem.ends_with(".txt") {
        Some((Kind::Txt, compression))
    } else {
        None
    })
}

/// Walks `inputs` (files or folders, recursively), keeps readable kinds, warns about the rest
/// (through `warn`) and returns the sources sorted by path, without duplicates.
pub fn discover(inputs: &[PathBuf], warn: &mut dyn FnMut(String)) -> Result<Vec<Source>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input)
            .with_context(|| format!("input {}: cannot read it", input.display()))?;
        if meta.is_dir() {
            walk(input, &mut files, warn)?;
        } else {
            files.push(input.clone());
        }
    }
    files.sort();
    files.dedup();
    let mut sources = Vec::new();
    for path in files {
        match classify(&path)? {
            Some((kind, compression)) => {
                let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                sources.push(Source {
                    path,
                    bytes,
                    kind,
                    compression,
                });
            }
            None => warn(format!(
                "{}: skipped (not .txt or .jsonl, plain, .gz or .zst)",
                path.display()
            )),
        }
    }
    if sources.is_empty() {
        bail!("no .txt or .jsonl input files (plain, .gz or .zst) found in the --input paths");
    }
    Ok(sources)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>, warn: &mut dyn FnMut(String)) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading folder {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading folder {}", dir.display()))?;
        let path = entry.path();
        let ft = entry
            .file_type()
            .with_context(|| format!("reading {}", path.display()))?;
        if ft.is_dir() {
            walk(&path, files, warn)?;
        } else if ft.is_file() {
            files.push(path);
        } else if ft.is_symlink() {
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => files.push(path),
                _ => warn(format!(
                    "{}: skipped (a link that is not to a file; links to folders are not followed)",
                    path.display()
                )),
            }
        }
    }
    Ok(())
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
        let (kind, compression) = classify(Path::new(name)).unwrap().unwrap();
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

    #[test]
    fn parquet_is_refused_and_unknown_extensions_are_ignored() {
        assert!(classify(Path::new("x.parquet")).is_err());
        assert!(classify(Path::new("x.csv")).unwrap().is_none());
        assert_eq!(
            classify(Path::new("X.TXT.ZST")).unwrap(),
            Some((Kind::Txt, Compression::Zstd))
        );
    }
}
