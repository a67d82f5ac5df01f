//! The stream loader of stateful training (`[train] carry_state`): every row a stream of
//! consecutive windows of whole documents, shuffled by document, split across ranks, resumable.

use std::collections::HashMap;
use std::path::PathBuf;

use reference::rng::Rng;
use trainer::data::loader::{LoaderConfig, Position, TokenBatch};
use trainer::data::manifest::{
    hex, Manifest, ShardEntry, Skipped, Split, TokenizerRef, MANIFEST_FORMAT, MANIFEST_VERSION,
};
use trainer::data::shard::{token_bytes_for, write_shard};
use trainer::data::stream::StreamLoader;

const SHA: [u8; 32] = [9; 32];
const VOCAB: usize = 5000;

/// Writes `n_shards` shards of random documents (lengths 1..=max_len) and the manifest; returns
/// the directory and every document's tokens.
fn corpus(
    name: &str,
    n_shards: usize,
    docs_per_shard: usize,
    max_len: u64,
) -> (PathBuf, Vec<Vec<u32>>) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("stream-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng::new(name.len() as u64 * 7919 + n_shards as u64);
    let (mut docs, mut entries, mut total) = (Vec::new(), Vec::new(), 0);
    for i in 0..n_shards {
        let (mut tokens, mut starts) = (Vec::new(), Vec::new());
        for _ in 0..docs_per_shard {
            let len = 1 + rng.below(max_len) as usize;
            let doc: Vec<u32> = (0..len).map(|_| rng.below(VOCAB as u64) as u32).collect();
            starts.push(tokens.len() as u64);
            tokens.extend_from_slice(&doc);
            docs.push(doc);
        }
        let file = format!("train-{i:05}.bin");
        let h = write_shard(&dir.join(&file), &tokens, &starts, VOCAB, SHA).unwrap();
        total += h.n_tokens;
        entries.push(ShardEntry {
            file,
            tokens: h.n_tokens,
            docs: h.n_docs,
            crc32: h.payload_crc32,
        });
    }
    Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        tokenizer: TokenizerRef {
            sha256: hex(&SHA),
            vocab_size: VOCAB,
            eot_id: VOCAB as u32 - 1,
            path: "tokenizer.json".into(),
        },
        token_bytes: token_bytes_for(VOCAB),
        train: Split {
            tokens: total,
            docs: docs.len() as u64,
            shards: entries,
        },
        val: Split::default(),
        sources: vec![],
        skipped: Skipped::default(),
        val_fraction: 0.0,
        split_seed: 0,
    }
    .save(&dir)
    .unwrap();
    (dir, docs)
}

fn cfg(batch: usize, seq_len: usize, rank: usize, world_size: usize) -> LoaderConfig {
    LoaderConfig {
        batch,
        seq_len,
        seed: 3,
        rank,
        world_size,
    }
}

/// One epoch of `l`: per row, its inputs and resets concatenated over the steps, after
/// checking that targets are the inputs shifted by one *across* windows.
fn epoch_rows(l: &mut StreamLoader) -> Vec<(Vec<u32>, Vec<bool>)> {
    let b0 = l.next_batch().unwrap();
    let mut rows: Vec<(Vec<u32>, Vec<bool>, Vec<u32>)> = (0..b0.batch)
        .map(|_| (Vec::new(), Vec::new(), Vec::new()))
        .collect();
    let mut push = |b: &TokenBatch| {
        for (r, row) in rows.iter_mut().enumerate() {
            let s = r * b.seq_len..(r + 1) * b.seq_len;
            row.0.extend_from_slice(&b.inputs[s.clone()]);
            row.1.extend_from_slice(&b.resets[s.clone()]);
            row.2.extend_from_slice(&b.targets[s]);
        }
    };
    push(&b0);
    for _ in 1..l.steps_per_epoch() {
        push(&l.next_batch().unwrap());
    }
    rows.into_iter()
        .map(|(inp, res, tgt)| {
            assert_eq!(inp[1..], tgt[..tgt.len() - 1], "windows tile the row");
            (inp, res)
        })
        .collect()
}

/// Cuts a row at its resets: each piece but the last must be a whole document, the last a
/// prefix of one. Returns the document indices, in order.
fn documents_of(
    row: &(Vec<u32>, Vec<bool>),
    docs: &HashMap<Vec<u32>, usize>,
    all: &[Vec<u32>],
) -> Vec<usize> {
    let (inp, res) = row;
    assert!(res[0], "a row starts with a reset");
    let starts: Vec<usize> = (0..inp.len()).filter(|&t| res[t]).collect();
    let mut out = Vec::new();
    for (i, &s) in starts.iter().enumerate() {
        let e = starts.get(i + 1).copied().unwrap_or(inp.len());
        let piece = &inp[s..e];
        if i + 1 < starts.len() {
            let d = docs.get(piece);
            assert!(d.is_some(), "piece {i} at {s}..{e} is a whole document");
            out.push(*d.unwrap());
        } else {
            let d = all.iter().position(|d| d.starts_with(piece));
            assert!(d.is_some(), "the last piece is a document's start");
        }
    }
    out
}

fn index(all: &[Vec<u32>]) -> HashMap<Vec<u32>, usize> {
    let m: HashMap<_, _> = all.iter().cloned().zip(0..).collect();
    assert_eq!(m.len(), all.len(), "random documents are distinct");
    m
}

#[test]
fn rows_are_whole_documents_in_consecutive_windows_with_resets_at_their_starts() {
    let (dir, all) = corpus("whole", 3, 40, 90);
    let docs = index(&all);
    let mut l = StreamLoader::open(&dir, "train", cfg(4, 7, 0, 1)).unwrap();
    assert_eq!(l.documents(), all.len());
    let rows = epoch_rows(&mut l);
    let mut seen = vec![0; all.len()];
    for row in &rows {
        assert_eq!(row.0.len() as u64, 7 * l.steps_per_epoch());
        for d in documents_of(row, &docs, &all) {
            seen[d] += 1;
        }
        assert!(
            row.1.iter().filter(|&&r| r).count() > 3,
            "several documents per row"
        );
    }
    assert!(
        seen.iter().all(|&n| n <= 1),
        "no document twice in an epoch"
    );
    let used = seen.iter().sum::<usize>();
    assert!(
        used + 3 * 4 >= all.len(),
        "the epoch drops at most a few documents per row ({used} of {})",
        all.len()
    );
}

#[test]
fn epochs_shuffle_documents_not_windows() {
    let (dir, all) = corpus("shuffle", 2, 30, 60);
    let docs = index(&all);
    let mut l = StreamLoader::open(&dir, "train", cfg(2, 5, 0, 1)).unwrap();
    let e0: Vec<Vec<usize>> = epoch_rows(&mut l)
        .iter()
        .map(|r| documents_of(r, &docs, &all))
        .collect();
    assert_eq!(l.next_batch().unwrap().epoch, 1);
    l.seek(Position { epoch: 1, step: 0 }).unwrap();
    let e1: Vec<Vec<usize>> = epoch_rows(&mut l)
        .iter()
        .map(|r| documents_of(r, &docs, &all))
        .collect();
    assert_ne!(e0, e1, "each epoch deals the documents afresh");
    let first: Vec<usize> = e0.iter().map(|r| r[0]).collect();
    assert_ne!(
        first,
        vec![0, 1],
        "the deal is shuffled, not in corpus order"
    );
}

#[test]
fn ranks_take_their_own_rows_of_the_global_batch() {
    let (dir, _) = corpus("ranks", 2, 50, 80);
    let mut whole = StreamLoader::open(&dir, "train", cfg(6, 9, 0, 1)).unwrap();
    let mut ranks: Vec<StreamLoader> = (0..3)
        .map(|r| StreamLoader::open(&dir, "train", cfg(2, 9, r, 3)).unwrap())
        .collect();
    assert_eq!(whole.steps_per_epoch(), ranks[0].steps_per_epoch());
    for _ in 0..whole.steps_per_epoch() + 3 {
        let w = whole.next_batch().unwrap();
        let parts: Vec<TokenBatch> = ranks.iter_mut().map(|l| l.next_batch().unwrap()).collect();
        let inputs: Vec<u32> = parts.iter().flat_map(|b| b.inputs.clone()).collect();
        let resets: Vec<bool> = parts.iter().flat_map(|b| b.resets.clone()).collect();
        assert_eq!((inputs, resets), (w.inputs, w.resets));
    }
}

#[test]
fn interleaved_groups_take_turns_each_reading_its_rows_in_order() {
    let (dir, _) = corpus("groups", 2, 60, 80);
    let (groups, chunk, batch) = (3, 2, 2);
    // The same deal as one group of `groups * batch` rows.
    let mut whole = StreamLoader::open(&dir, "train", cfg(groups * batch, 7, 0, 1)).unwrap();
    let all: Vec<TokenBatch> = (0..whole.steps_per_epoch())
        .map(|_| whole.next_batch().unwrap())
        .collect();
    let mut l = StreamLoader::open(&dir, "train", cfg(batch, 7, 0, 1))
        .unwrap()
        .interleave(groups, chunk)
        .unwrap();
    let per_row = l.steps_per_epoch() / groups as u64;
    assert_eq!(per_row, all.len() as u64 / 2 * 2, "whole turns of a group");
    let mut next = vec![0usize; groups];
    for s in 0..l.steps_per_epoch() {
        let b = l.next_batch().unwrap();
        let g = l.group_of(s);
        assert_eq!(
            g,
            (s as usize / chunk) % groups,
            "step {s}: groups take turns"
        );
        let w = &all[next[g]];
        let rows = g * batch * 7..(g + 1) * batch * 7;
        assert_eq!(
            b.inputs,
            w.inputs[rows.clone()],
            "step {s}: group {g}'s next window"
        );
        assert_eq!(b.targets, w.targets[rows.clone()]);
        assert_eq!(b.resets, w.resets[rows]);
        next[g] += 1;
    }
    let err = StreamLoader::open(&dir, "train", cfg(batch, 7, 0, 1))
        .unwrap()
        .interleave(61, 1)
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("120 documents are fewer than the 122 rows"),
        "{err:#}"
    );
}

#[test]
fn seek_resumes_exactly_across_an_epoch_boundary() {
    let (dir, _) = corpus("seek", 2, 30, 70);
    let mut a = StreamLoader::open(&dir, "train", cfg(3, 6, 0, 1)).unwrap();
    let n = a.steps_per_epoch() + 5;
    let batches: Vec<TokenBatch> = (0..n).map(|_| a.next_batch().unwrap()).collect();
    for cut in [1, n as usize / 2, n as usize - 3] {
        let mut b = StreamLoader::open(&dir, "train", cfg(3, 6, 0, 1)).unwrap();
        let pos = Position {
            epoch: batches[cut].epoch,
            step: batches[cut].step,
        };
        b.seek(pos).unwrap();
        for want in &batches[cut..] {
            assert_eq!(&b.next_batch().unwrap(), want, "after a seek to {pos:?}");
        }
    }
}

#[test]
fn too_few_documents_or_too_short_rows_are_clear_errors() {
    let (dir, _) = corpus("few", 1, 3, 50);
    let err = StreamLoader::open(&dir, "train", cfg(4, 8, 0, 1))
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("3 documents, fewer than the 4 rows"),
        "{err:#}"
    );
    let err = StreamLoader::open(&dir, "train", cfg(1, 10_000, 0, 1))
        .err()
        .unwrap();
    assert!(
        format!("{err:#}").contains("shorter than one window"),
        "{err:#}"
    );
}
