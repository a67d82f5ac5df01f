//! Corpus inputs, the one way `vet-data tokenizer` and `vet-data prepare` find and open them:
//! `.txt` and `.jsonl` files, each plain, `.gz` or `.zst` / `.zstd`; folders walked
//! recursively in sorted order; Parquet refused with a hint on converting it.
//!
//! What a format's bytes mean (a `.txt` line is one text to the tokenizer trainer, a whole
//! `.txt` file one document to `prepare`) is up to each command.

use std::io::{self, BufRead, BufReader, Read};
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
    /// One JSON object per line.
    Jsonl,
    /// Plain text.
    Txt,
}

/// An input file, classified by its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputFile {
    pub path: PathBuf,
    pub kind: Kind,
    pub compression: Compression,
}

/// What the inputs may be, for messages.
pub const ACCEPTED: &str = ".txt or .jsonl, plain, .gz or .zst";

/// Classifies a path by its extension (case-insensitive); `Ok(None)` for extensions neither
/// command reads, an error with a conversion hint for Parquet.
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

/// The input files `inputs` name, sorted by path without duplicates. A file named directly
/// must be a corpus file (else an error naming it); files of another kind inside a folder are
/// skipped with a warning through `warn`. No corpus file at all is an error.
pub fn discover(inputs: &[PathBuf], warn: &mut dyn FnMut(String)) -> Result<Vec<InputFile>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input)
            .with_context(|| format!("input {}: cannot read it", input.display()))?;
        if meta.is_dir() {
            walk(input, &mut files, warn)?;
        } else if classify(input)?.is_none() {
            bail!("input {}: not a corpus file ({ACCEPTED})", input.display());
        } else {
            files.push(input.clone());
        }
    }
    files.sort();
    files.dedup();
    let mut found = Vec::new();
    for path in files {
        match classify(&path)? {
            Some((kind, compression)) => found.push(InputFile {
                path,
                kind,
                compression,
            }),
            None => warn(format!("{}: skipped (not {ACCEPTED})", path.display())),
        }
    }
    if found.is_empty() {
        let names: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        bail!("no {ACCEPTED} input files in {}", names.join(", "));
    }
    Ok(found)
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

const READ_BUF: usize = 1 << 20;

/// `raw` (a file's bytes as stored) decompressed as `compression` says, buffered.
pub fn decode<R: Read + Send + 'static>(
    raw: R,
    compression: Compression,
) -> io::Result<Box<dyn BufRead + Send>> {
    Ok(match compression {
        Compression::None => Box::new(BufReader::with_capacity(READ_BUF, raw)),
        Compression::Gzip => {
            let inner = BufReader::with_capacity(READ_BUF / 4, raw);
            let dec = flate2::bufread::MultiGzDecoder::new(inner);
            Box::new(BufReader::with_capacity(READ_BUF, dec))
        }
        Compression::Zstd => {
            let inner = BufReader::with_capacity(READ_BUF / 4, raw);
            let dec = zstd::stream::read::Decoder::with_buffer(inner)?;
            Box::new(BufReader::with_capacity(READ_BUF, dec))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_the_accepted_extensions_is_classified() {
        for (name, want) in [
            ("a.txt", (Kind::Txt, Compression::None)),
            ("a.jsonl", (Kind::Jsonl, Compression::None)),
            ("a.txt.gz", (Kind::Txt, Compression::Gzip)),
            ("a.jsonl.zst", (Kind::Jsonl, Compression::Zstd)),
            ("a.jsonl.zstd", (Kind::Jsonl, Compression::Zstd)),
            ("X.TXT.ZST", (Kind::Txt, Compression::Zstd)),
        ] {
            assert_eq!(classify(Path::new(name)).unwrap(), Some(want), "{name}");
        }
        assert!(classify(Path::new("x.csv")).unwrap().is_none());
        assert!(classify(Path::new("x.json.gz")).unwrap().is_none());
        for pq in ["x.parquet", "x.parquet.zst"] {
            let err = classify(Path::new(pq)).unwrap_err().to_string();
            assert!(err.contains("Parquet is not supported"), "{err}");
        }
    }

    #[test]
    fn every_codec_decodes_to_the_same_text() {
        let text = b"first line\nsecond line\n".repeat(1000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &text).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&text[..], 3).unwrap();
        for (bytes, c) in [
            (text.clone(), Compression::None),
            (gz, Compression::Gzip),
            (zst, Compression::Zstd),
        ] {
            let mut out = Vec::new();
            decode(io::Cursor::new(bytes), c)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            assert!(out == text, "{c:?} decoded to other bytes");
        }
    }
}
