//! Packs one unit's documents of one split into shards of at most `shard_tokens` tokens.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::data::manifest::ShardEntry;
use crate::data::shard::write_shard;

/// The tokenizer facts every shard header carries.
#[derive(Clone, Copy, Debug)]
pub struct ShardMeta {
    pub vocab_size: usize,
    pub tokenizer_sha256: [u8; 32],
}

/// Shard file name of split `split`, unit `unit`, sequence number `seq`.
pub fn shard_name(split: &str, unit: usize, seq: usize) -> String {
    format!("{split}-u{unit:06}-{seq:04}.bin")
}

/// Accumulates documents and writes a shard whenever the next one would not fit. A document
/// is only split when it alone is larger than a shard; the continuation shard then starts
/// with a document start at 0 (readers see it as a new document).
pub struct SplitWriter {
    dir: PathBuf,
    split: &'static str,
    unit: usize,
    shard_tokens: usize,
    meta: ShardMeta,
    buf: Vec<u32>,
    starts: Vec<u64>,
    /// Where the document being written starts in `buf`.
    cur: usize,
    /// Shards written, in order.
    pub entries: Vec<ShardEntry>,
    /// Whole documents begun.
    pub docs: u64,
}

impl SplitWriter {
    pub fn new(
        dir: &Path,
        split: &'static str,
        unit: usize,
        shard_tokens: usize,
        meta: ShardMeta,
    ) -> Self {
        SplitWriter {
            dir: dir.to_path_buf(),
            split,
            unit,
            shard_tokens: shard_tokens.max(1),
            meta,
            buf: Vec::new(),
            starts: Vec::new(),
            cur: 0,
            entries: Vec::new(),
            docs: 0,
        }
    }

    /// Starts a document.
    pub fn begin_doc(&mut self) {
        self.cur = self.buf.len();
        self.starts.push(self.cur as u64);
        self.docs += 1;
    }

    /// Appends tokens of the current document, writing shards as they fill.
    pub fn push(&mut self, mut tokens: &[u32]) -> Result<()> {
        while !tokens.is_empty() {
            let room = self.shard_tokens.saturating_sub(self.buf.len());
            if room == 0 {
                self.make_room()?;
                continue;
            }
            let n = room.min(tokens.len());
            self.buf.extend_from_slice(&tokens[..n]);
            tokens = &tokens[n..];
        }
        Ok(())
    }

    /// The buffer is full: write the documents before the current one, or (when the current
    /// one fills the buffer by itself) write it as far as it goes.
    fn make_room(&mut self) -> Result<()> {
        if self.cur > 0 {
            let starts: Vec<u64> = self.starts[..self.starts.len() - 1].to_vec();
            self.write(self.cur, &starts)?;
            self.buf.drain(..self.cur);
        } else {
            let starts = std::mem::take(&mut self.starts);
            self.write(self.buf.len(), &starts)?;
            self.buf.clear();
        }
        self.starts = vec![0];
        self.cur = 0;
        Ok(())
    }

    fn write(&mut self, n_tokens: usize, starts: &[u64]) -> Result<()> {
        let name = shard_name(self.split, self.unit, self.entries.len());
        let path = self.dir.join(&name);
        let header = write_shard(
            &path,
            &self.buf[..n_tokens],
            starts,
            self.meta.vocab_size,
            self.meta.tokenizer_sha256,
        )
        .with_context(|| format!("writing shard {} (is the disk full?)", path.display()))?;
        self.entries.push(ShardEntry {
            file: name,
            tokens: header.n_tokens,
            docs: header.n_docs,
            crc32: header.payload_crc32,
        });
        Ok(())
    }

    /// Writes what is left; returns the shard entries.
    pub fn finish(mut self) -> Result<(Vec<ShardEntry>, u64)> {
        if !self.buf.is_empty() {
            let starts = std::mem::take(&mut self.starts);
            self.write(self.buf.len(), &starts)?;
        }
        Ok((self.entries, self.docs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shard::Shard;

    #[test]
    fn documents_stay_whole_unless_larger_than_a_shard() {
        let dir = std::env::temp_dir().join(format!("vm-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let meta = ShardMeta {
            vocab_size: 300,
            tokenizer_sha256: [0; 32],
        };
        let mut w = SplitWriter::new(&dir, "train", 3, 10, meta);
        for doc in [vec![1u32; 4], vec![2; 4], vec![3; 25], vec![4; 3]] {
            w.begin_doc();
            for piece in doc.chunks(3) {
                w.push(piece).unwrap();
            }
        }
        let (entries, docs) = w.finish().unwrap();
        assert_eq!(docs, 4);
        let mut got = Vec::new();
        for e in &entries {
            let s = Shard::open(&dir.join(&e.file)).unwrap();
            s.verify().unwrap();
            let mut t = vec![0; s.len()];
            s.read_tokens(0, &mut t);
            got.push((t, s.doc_starts()));
        }
        assert_eq!(got[0], (vec![1, 1, 1, 1, 2, 2, 2, 2], vec![0, 4]));
        assert_eq!(got[1], (vec![3; 10], vec![0]));
        assert_eq!(got[2], (vec![3; 10], vec![0]));
        assert_eq!(got[3], (vec![3, 3, 3, 3, 3, 4, 4, 4], vec![0, 5]));
        assert_eq!(entries[0].file, "train-u000003-0000.bin");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
