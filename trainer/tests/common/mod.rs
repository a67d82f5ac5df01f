//! Helpers shared by the training tests (`train.rs`, `nothing_lost.rs`).

use std::path::{Path, PathBuf};

use trainer::data::manifest::{
    sha256_file, Manifest, ShardEntry, Skipped, Split, TokenizerRef, MANIFEST_FORMAT,
    MANIFEST_VERSION,
};
use trainer::data::shard::{token_bytes_for, write_shard};

/// A fresh, empty `CARGO_TARGET_TMPDIR/{prefix}-{name}`.
pub fn scratch(prefix: &str, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{prefix}-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny checkpoint's byte-level tokenizer.
pub fn tokenizer() -> PathBuf {
    fixtures::tiny_checkpoint().join("tokenizer.json")
}

/// Byte-token shards of the first bundled corpus documents (their first `doc_bytes` bytes, one
/// token each): train (8 documents) and val (2), plus the manifest; returns its path.
pub fn byte_shards(dir: &Path, doc_bytes: usize) -> PathBuf {
    let text = std::fs::read_to_string(fixtures::data().join("corpus.jsonl")).unwrap();
    let tok = tokenizer();
    let sha = sha256_file(&tok).unwrap();
    let mut sha_bytes = [0u8; 32];
    for (i, b) in sha_bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&sha[2 * i..2 * i + 2], 16).unwrap();
    }
    let split = |name: &str, lines: std::ops::Range<usize>| {
        let (mut tokens, mut starts) = (Vec::new(), Vec::new());
        for line in text.lines().skip(lines.start).take(lines.len()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            starts.push(tokens.len() as u64);
            tokens.extend(
                v["text"]
                    .as_str()
                    .unwrap()
                    .bytes()
                    .take(doc_bytes)
                    .map(u32::from),
            );
            tokens.push(256);
        }
        let file = format!("{name}-0.bin");
        let h = write_shard(&dir.join(&file), &tokens, &starts, 257, sha_bytes).unwrap();
        Split {
            shards: vec![ShardEntry {
                file,
                tokens: h.n_tokens,
                docs: h.n_docs,
                crc32: h.payload_crc32,
            }],
            tokens: h.n_tokens,
            docs: h.n_docs,
        }
    };
    let train = split("train", 0..8);
    let val = split("val", 8..10);
    let m = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        tokenizer: TokenizerRef {
            sha256: sha,
            vocab_size: 257,
            eot_id: 256,
            path: tok.display().to_string(),
        },
        token_bytes: token_bytes_for(257),
        train,
        val,
        sources: vec![],
        skipped: Skipped::default(),
        val_fraction: 0.2,
        split_seed: 0,
    };
    m.save(dir).unwrap();
    dir.join("manifest.json")
}
