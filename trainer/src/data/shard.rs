//! Token shards: one binary file of tokens with its document boundaries.
//!
//! Layout (all little-endian), 128-byte header then payload:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"VMSHARD\0"` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | token width in bytes: 2 (u16) or 4 (u32) |
//! | 16 | 8 | `n_tokens` |
//! | 24 | 8 | `n_docs` |
//! | 32 | 8 | tokenizer vocabulary size |
//! | 40 | 32 | SHA-256 of the tokenizer's `tokenizer.json` |
//! | 72 | 4 | CRC-32 of the payload (tokens, padding, doc starts) |
//! | 76 | 4 | CRC-32 of header bytes 0..76 |
//! | 80 | 48 | zero |
//! | 128 | `n_tokens * width` | tokens |
//! | … | 0–7 | zero padding to a multiple of 8 |
//! | … | `8 * n_docs` | u64 offset of each document's first token, increasing, first is 0 |
//!
//! Readers map the file (`memmap2`), so memory does not grow with the corpus. The header and
//! the file length are checked on open; the payload checksum by [`Shard::verify`].

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub const MAGIC: &[u8; 8] = b"VMSHARD\0";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 128;

/// A shard problem, always naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("shard {path}: {msg}")]
    Corrupt { path: String, msg: String },
    #[error("shard {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn corrupt(path: &Path, msg: impl Into<String>) -> ShardError {
    ShardError::Corrupt {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

fn io_err(path: &Path, source: std::io::Error) -> ShardError {
    ShardError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Token width for a vocabulary: u16 when every id fits, else u32.
pub fn token_bytes_for(vocab_size: usize) -> u32 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// The parsed header of a shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    pub token_bytes: u32,
    pub n_tokens: u64,
    pub n_docs: u64,
    pub vocab_size: u64,
    pub tokenizer_sha256: [u8; 32],
    pub payload_crc32: u32,
}

impl ShardHeader {
    fn payload_len(&self) -> Option<u64> {
        let tok = self.n_tokens.checked_mul(self.token_bytes as u64)?;
        let padded = tok.checked_add(7)? / 8 * 8;
        padded.checked_add(self.n_docs.checked_mul(8)?)
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.token_bytes.to_le_bytes());
        h[16..24].copy_from_slice(&self.n_tokens.to_le_bytes());
        h[24..32].copy_from_slice(&self.n_docs.to_le_bytes());
        h[32..40].copy_from_slice(&self.vocab_size.to_le_bytes());
        h[40..72].copy_from_slice(&self.tokenizer_sha256);
        h[72..76].copy_from_slice(&self.payload_crc32.to_le_bytes());
        let crc = crc32fast::hash(&h[0..76]);
        h[76..80].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn decode(path: &Path, h: &[u8]) -> Result<ShardHeader, ShardError> {
        if h.len() < HEADER_LEN {
            return Err(corrupt(
                path,
                format!(
                    "file is {} bytes, shorter than the {HEADER_LEN}-byte header",
                    h.len()
                ),
            ));
        }
        if &h[0..8] != MAGIC {
            return Err(corrupt(path, "not a Vet-Mamba token shard (bad magic)"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or([0; 8]));
        let version = u32_at(8);
        if version != VERSION {
            return Err(corrupt(
                path,
                format!("format version {version}, this build reads {VERSION}"),
            ));
        }
        if crc32fast::hash(&h[0..76]) != u32_at(76) {
            return Err(corrupt(path, "header checksum mismatch"));
        }
        let token_bytes = u32_at(12);
        if token_bytes != 2 && token_bytes != 4 {
            return Err(corrupt(
                path,
                format!("token width {token_bytes}, expected 2 or 4"),
            ));
        }
        let mut tokenizer_sha256 = [0u8; 32];
        tokenizer_sha256.copy_from_slice(&h[40..72]);
        Ok(ShardHeader {
            token_bytes,
            n_tokens: u64_at(16),
            n_docs: u64_at(24),
            vocab_size: u64_at(32),
            tokenizer_sha256,
            payload_crc32: u32_at(72),
        })
    }
}

/// Writes one shard atomically: to `path.tmp`, fsync, rename.
pub fn write_shard(
    path: &Path,
    tokens: &[u32],
    doc_starts: &[u64],
    vocab_size: usize,
    tokenizer_sha256: [u8; 32],
) -> Result<ShardHeader, ShardError> {
    let token_bytes = token_bytes_for(vocab_size);
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(corrupt(
            path,
            format!("token {t} is outside the vocabulary of {vocab_size}"),
        ));
    }
    if doc_starts.windows(2).any(|w| w[0] >= w[1])
        || doc_starts.last().is_some_and(|&s| s >= tokens.len() as u64)
        || doc_starts.first().is_some_and(|&s| s != 0)
    {
        return Err(corrupt(
            path,
            "document starts must begin at 0, increase, and lie inside the shard",
        ));
    }
    let mut payload =
        Vec::with_capacity(tokens.len() * token_bytes as usize + 8 + doc_starts.len() * 8);
    for &t in tokens {
        if token_bytes == 2 {
            payload.extend_from_slice(&(t as u16).to_le_bytes());
        } else {
            payload.extend_from_slice(&t.to_le_bytes());
        }
    }
    while payload.len() % 8 != 0 {
        payload.push(0);
    }
    for &s in doc_starts {
        payload.extend_from_slice(&s.to_le_bytes());
    }
    let header = ShardHeader {
        token_bytes,
        n_tokens: tokens.len() as u64,
        n_docs: doc_starts.len() as u64,
        vocab_size: vocab_size as u64,
        tokenizer_sha256,
        payload_crc32: crc32fast::hash(&payload),
    };
    reference::fs::atomic_write_with(path, |f| {
        f.write_all(&header.encode())?;
        f.write_all(&payload)
    })
    .map_err(|e| io_err(path, e))?;
    Ok(header)
}

/// A memory-mapped shard.
pub struct Shard {
    pub path: PathBuf,
    pub header: ShardHeader,
    map: Mmap,
}

impl Shard {
    /// Maps `path` and checks its header and length (not the payload checksum).
    pub fn open(path: &Path) -> Result<Shard, ShardError> {
        let file = File::open(path).map_err(|e| io_err(path, e))?;
        // SAFETY: the file is opened read-only and shards are never modified in place (writers
        // create a new file and rename it); a concurrent truncation by another program could
        // still fault, as with any mmap.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
        let header = ShardHeader::decode(path, &map)?;
        let want = header
            .payload_len()
            .and_then(|p| p.checked_add(HEADER_LEN as u64))
            .ok_or_else(|| corrupt(path, "header sizes overflow"))?;
        if map.len() as u64 != want {
            return Err(corrupt(
                path,
                format!(
                    "file is {} bytes but its header describes {want} ({} tokens, {} documents): truncated or corrupt",
                    map.len(),
                    header.n_tokens,
                    header.n_docs
                ),
            ));
        }
        Ok(Shard {
            path: path.to_path_buf(),
            header,
            map,
        })
    }

    /// Checks the payload checksum and the document starts.
    pub fn verify(&self) -> Result<(), ShardError> {
        if crc32fast::hash(&self.map[HEADER_LEN..]) != self.header.payload_crc32 {
            return Err(corrupt(
                &self.path,
                "payload checksum mismatch: the tokens or document starts are corrupt",
            ));
        }
        let n = self.header.n_tokens;
        let mut prev = None;
        for i in 0..self.header.n_docs as usize {
            let s = self.doc_start(i);
            if s >= n || prev.is_some_and(|p| s <= p) || (i == 0 && s != 0) {
                return Err(corrupt(
                    &self.path,
                    format!("document start {i} = {s} is out of order or outside {n} tokens"),
                ));
            }
            prev = Some(s);
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.header.n_tokens as usize
    }

    pub fn is_empty(&self) -> bool {
        self.header.n_tokens == 0
    }

    /// Token `i`.
    #[inline]
    pub fn token(&self, i: usize) -> u32 {
        let o = HEADER_LEN + i * self.header.token_bytes as usize;
        if self.header.token_bytes == 2 {
            u16::from_le_bytes([self.map[o], self.map[o + 1]]) as u32
        } else {
            u32::from_le_bytes([
                self.map[o],
                self.map[o + 1],
                self.map[o + 2],
                self.map[o + 3],
            ])
        }
    }

    /// Copies tokens `start..start + out.len()` into `out`.
    pub fn read_tokens(&self, start: usize, out: &mut [u32]) {
        let w = self.header.token_bytes as usize;
        let bytes = &self.map[HEADER_LEN + start * w..HEADER_LEN + (start + out.len()) * w];
        if w == 2 {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = u16::from_le_bytes([c[0], c[1]]) as u32;
            }
        } else {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }

    fn docs_offset(&self) -> usize {
        let tok = self.header.n_tokens as usize * self.header.token_bytes as usize;
        HEADER_LEN + tok.div_ceil(8) * 8
    }

    /// Offset of document `i`'s first token.
    pub fn doc_start(&self, i: usize) -> u64 {
        let o = self.docs_offset() + 8 * i;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.map[o..o + 8]);
        u64::from_le_bytes(b)
    }

    /// Every document start.
    pub fn doc_starts(&self) -> Vec<u64> {
        (0..self.header.n_docs as usize)
            .map(|i| self.doc_start(i))
            .collect()
    }
}
