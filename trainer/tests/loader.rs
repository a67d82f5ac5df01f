//! The batch loaders: pretraining windows over token shards and QA fine-tuning batches.
//!
//! Every corpus here is drawn from a seed (random tokens, random document lengths), written
//! with `write_shard` and a hand-made manifest, so these tests do not depend on `vet-data`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use reference::rng::Rng;
use trainer::data::loader::{epoch_order, Loader, LoaderConfig, Position, TokenBatch};
use trainer::data::manifest::{
    hex, Manifest, ShardEntry, Skipped, Split, TokenizerRef, MANIFEST_FORMAT, MANIFEST_VERSION,
};
use trainer::data::qa::{read_qa_jsonl, QaBatch, QaBatcher, QaConfig, QaPair, QaTemplate};
use trainer::data::shard::{token_bytes_for, write_shard};
use trainer::tokenizer;

const SHA: [u8; 32] = [7; 32];

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("loader-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The whole split as the loader should see it.
struct Corpus {
    dir: PathBuf,
    stream: Vec<u32>,
    /// Global document starts, increasing.
    doc_starts: Vec<u64>,
}

/// Writes one shard per entry of `docs` (each a list of document lengths) with random tokens
/// below `vocab`, plus the manifest (all shards in the train split).
fn write_corpus(name: &str, docs: &[Vec<usize>], vocab: usize, seed: u64) -> Corpus {
    let dir = scratch(name);
    let mut rng = Rng::new(seed);
    let (mut stream, mut doc_starts, mut entries) = (Vec::new(), Vec::new(), Vec::new());
    for (i, lens) in docs.iter().enumerate() {
        let (mut tokens, mut starts) = (Vec::new(), Vec::new());
        for &len in lens {
            starts.push(tokens.len() as u64);
            doc_starts.push((stream.len() + tokens.len()) as u64);
            tokens.extend((0..len).map(|_| rng.below(vocab as u64) as u32));
        }
        let file = format!("train-{i:05}.bin");
        let h = write_shard(&dir.join(&file), &tokens, &starts, vocab, SHA).unwrap();
        entries.push(ShardEntry {
            file,
            tokens: h.n_tokens,
            docs: h.n_docs,
            crc32: h.payload_crc32,
        });
        stream.extend_from_slice(&tokens);
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        tokenizer: TokenizerRef {
            sha256: hex(&SHA),
            vocab_size: vocab,
            eot_id: vocab as u32 - 1,
            path: "tokenizer.json".into(),
        },
        token_bytes: token_bytes_for(vocab),
        train: Split {
            tokens: stream.len() as u64,
            docs: doc_starts.len() as u64,
            shards: entries,
        },
        val: Split::default(),
        sources: vec![],
        skipped: Skipped::default(),
        val_fraction: 0.0,
        split_seed: 0,
    };
    manifest.save(&dir).unwrap();
    Corpus {
        dir,
        stream,
        doc_starts,
    }
}

/// Shards of random documents: `n_shards` shards of about `tokens` tokens each.
fn random_docs(n_shards: usize, tokens: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = Rng::new(seed);
    (0..n_shards)
        .map(|_| {
            let mut lens = Vec::new();
            let mut total = 0;
            while total < tokens {
                let len = 1 + rng.below(60) as usize;
                lens.push(len);
                total += len;
            }
            lens
        })
        .collect()
}

fn cfg(batch: usize, seq_len: usize, seed: u64, rank: usize, world_size: usize) -> LoaderConfig {
    LoaderConfig {
        batch,
        seq_len,
        seed,
        rank,
        world_size,
    }
}

/// Each row of `b` as its full window (`inputs ++ last target`), after checking that the
/// targets are the inputs shifted by one.
fn windows(b: &TokenBatch) -> Vec<Vec<u32>> {
    (0..b.batch)
        .map(|r| {
            let inp = &b.inputs[r * b.seq_len..(r + 1) * b.seq_len];
            let tgt = &b.targets[r * b.seq_len..(r + 1) * b.seq_len];
            assert_eq!(inp[1..], tgt[..b.seq_len - 1], "targets are inputs shifted");
            let mut w = inp.to_vec();
            w.push(tgt[b.seq_len - 1]);
            w
        })
        .collect()
}

/// Sample index of every window of the stream, by content.
fn sample_index(c: &Corpus, seq_len: usize) -> HashMap<Vec<u32>, usize> {
    let map: HashMap<_, _> = c
        .stream
        .chunks_exact(seq_len + 1)
        .enumerate()
        .map(|(k, w)| (w.to_vec(), k))
        .collect();
    assert_eq!(
        map.len(),
        c.stream.len() / (seq_len + 1),
        "windows are distinct"
    );
    map
}

#[test]
fn windows_reconstruct_the_stream_in_sample_order() {
    let c = write_corpus("reconstruct", &random_docs(3, 500, 1), 1000, 11);
    let (seq_len, seed) = (16, 5);
    let mut l = Loader::open(&c.dir, "train", cfg(1, seq_len, seed, 0, 1)).unwrap();
    let n = l.samples();
    assert_eq!(n, c.stream.len() / (seq_len + 1));
    assert_eq!(l.steps_per_epoch(), n as u64);
    assert_eq!(l.tokens_per_epoch(), (n * seq_len) as u64);
    let order = epoch_order(n, seed, 0).unwrap();
    let mut by_index = vec![Vec::new(); n];
    for &k in &order {
        by_index[k as usize] = windows(&l.next_batch().unwrap()).remove(0);
    }
    let whole = n * (seq_len + 1);
    assert_eq!(by_index.concat(), c.stream[..whole]);
}

#[test]
fn u32_tokens_reconstruct_the_stream() {
    let c = write_corpus("u32", &random_docs(2, 300, 2), 70_000, 12);
    assert_eq!(token_bytes_for(70_000), 4);
    let seq_len = 9;
    let index = sample_index(&c, seq_len);
    let mut l = Loader::open(&c.dir, "train", cfg(2, seq_len, 1, 0, 1)).unwrap();
    let (mut seen, mut high) = (HashSet::new(), 0);
    for _ in 0..l.steps_per_epoch() {
        for w in windows(&l.next_batch().unwrap()) {
            high += w.iter().filter(|&&t| t >= 1 << 16).count();
            assert!(seen.insert(index[&w]));
        }
    }
    assert!(index.len() - seen.len() < 2);
    assert!(high > 10, "ids above u16 survive ({high})");
}

#[test]
fn each_epoch_is_a_permutation_and_epochs_differ() {
    let c = write_corpus("permutation", &random_docs(2, 700, 3), 1000, 13);
    let seq_len = 12;
    let index = sample_index(&c, seq_len);
    let mut l = Loader::open(&c.dir, "train", cfg(1, seq_len, 9, 0, 1)).unwrap();
    let mut epochs = Vec::new();
    for epoch in 0..3 {
        let mut order = Vec::new();
        for step in 0..l.steps_per_epoch() {
            let b = l.next_batch().unwrap();
            assert_eq!((b.epoch, b.step), (epoch, step));
            order.push(index[&windows(&b)[0]]);
        }
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (0..index.len()).collect::<Vec<_>>(),
            "epoch {epoch}"
        );
        epochs.push(order);
    }
    assert_ne!(epochs[0], epochs[1]);
    assert_ne!(epochs[1], epochs[2]);
    let sorted: Vec<usize> = (0..index.len()).collect();
    assert_ne!(epochs[0], sorted, "the order is shuffled");
}

#[test]
fn ranks_get_disjoint_samples_covering_the_epoch() {
    let c = write_corpus("ranks", &random_docs(4, 400, 4), 1000, 14);
    let (seq_len, batch, world) = (10, 2, 3);
    let index = sample_index(&c, seq_len);
    let mut seen: HashMap<usize, usize> = HashMap::new();
    let mut steps = 0;
    for rank in 0..world {
        let mut l = Loader::open(&c.dir, "train", cfg(batch, seq_len, 3, rank, world)).unwrap();
        steps = l.steps_per_epoch();
        for _ in 0..steps {
            for w in windows(&l.next_batch().unwrap()) {
                if let Some(other) = seen.insert(index[&w], rank) {
                    panic!("sample {} given to ranks {other} and {rank}", index[&w]);
                }
            }
        }
        assert_eq!(l.next_batch().unwrap().epoch, 1);
    }
    let global = (batch * world) as u64;
    assert_eq!(steps, index.len() as u64 / global);
    assert_eq!(seen.len() as u64, steps * global);
    assert!(
        (index.len() - seen.len()) < global as usize,
        "only the tail is dropped"
    );
}

#[test]
fn seek_reproduces_the_next_batches_across_an_epoch_boundary() {
    let c = write_corpus("seek", &random_docs(3, 300, 5), 1000, 15);
    let config = cfg(2, 8, 77, 1, 2);
    let mut a = Loader::open(&c.dir, "train", config).unwrap();
    let spe = a.steps_per_epoch();
    assert!(spe > 5);
    for _ in 0..2 * spe - 2 {
        a.next_batch().unwrap();
    }
    let saved = serde_json::to_string(&a.position()).unwrap();
    let want: Vec<TokenBatch> = (0..5).map(|_| a.next_batch().unwrap()).collect();
    assert_eq!((want[0].epoch, want[4].epoch), (1, 2), "crosses an epoch");

    let mut b = Loader::open(&c.dir, "train", config).unwrap();
    b.next_batch().unwrap();
    let pos: Position = serde_json::from_str(&saved).unwrap();
    assert_eq!(
        pos,
        Position {
            epoch: 1,
            step: spe - 2
        }
    );
    b.seek(pos).unwrap();
    let mut got = TokenBatch::default();
    for w in &want {
        b.next_batch_into(&mut got).unwrap();
        assert_eq!(&got, w);
    }
    assert!(b
        .seek(Position {
            epoch: 0,
            step: spe + 1
        })
        .is_err());
}

#[test]
fn resets_match_document_starts_across_shards() {
    let seq_len = 10; // windows of 11 tokens
                      // Shard 0: 25 tokens (not a multiple of 11, so window 2 spans shards 0 and 1); a document
                      // starts exactly at window 1's start (11), one right after it (12), and one at 21, the
                      // target-only last token of window 1. Shard 1 starts a document at the shard boundary.
    let docs = vec![vec![11, 1, 9, 4], vec![3, 20, 7, 2], vec![40]];
    let c = write_corpus("resets", &docs, 1000, 16);
    assert!(c.doc_starts.contains(&11) && c.doc_starts.contains(&25));
    let index = sample_index(&c, seq_len);
    let mut l = Loader::open(&c.dir, "train", cfg(1, seq_len, 2, 0, 1)).unwrap();
    let mut checked = HashSet::new();
    for _ in 0..l.steps_per_epoch() {
        let b = l.next_batch().unwrap();
        let k = index[&windows(&b)[0]];
        let start = (k * (seq_len + 1)) as u64;
        let want: Vec<bool> = (0..seq_len as u64)
            .map(|t| t == 0 || c.doc_starts.contains(&(start + t)))
            .collect();
        assert_eq!(b.resets, want, "window {k} at {start}");
        checked.insert(k);
    }
    assert!(checked.contains(&1) && checked.contains(&2));
}

#[test]
fn resets_match_document_starts_on_a_large_random_corpus() {
    let c = write_corpus("resets-random", &random_docs(5, 2000, 6), 5000, 17);
    let seq_len = 31;
    let index = sample_index(&c, seq_len);
    let mut l = Loader::open(&c.dir, "train", cfg(4, seq_len, 8, 0, 1)).unwrap();
    for _ in 0..l.steps_per_epoch() {
        let b = l.next_batch().unwrap();
        for (r, w) in windows(&b).iter().enumerate() {
            let start = (index[w] * (seq_len + 1)) as u64;
            for t in 0..seq_len {
                let want = t == 0 || c.doc_starts.binary_search(&(start + t as u64)).is_ok();
                assert_eq!(b.resets[r * seq_len + t], want, "window at {start}, t {t}");
            }
        }
    }
}

fn open_err(dir: &Path, config: LoaderConfig) -> String {
    match Loader::open(dir, "train", config) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn a_truncated_shard_is_an_error_naming_it() {
    let c = write_corpus("truncated", &random_docs(3, 200, 7), 1000, 18);
    let path = c.dir.join("train-00001.bin");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 10).unwrap();
    let e = open_err(&c.dir, cfg(1, 8, 0, 0, 1));
    assert!(
        e.contains("train-00001.bin") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn a_manifest_disagreeing_with_a_shard_is_an_error_naming_it() {
    let c = write_corpus("mismatch", &random_docs(2, 200, 8), 1000, 19);
    let (manifest, _) = Manifest::load(&c.dir).unwrap();
    type Edit = fn(&mut Manifest);
    // The tokenizer hash is checked on every shard, so the first shard is named.
    let cases: [(&str, &str, Edit); 4] = [
        ("crc", "train-00001.bin", |m| m.train.shards[1].crc32 ^= 1),
        ("tokens", "train-00001.bin", |m| {
            m.train.shards[1].tokens += 1
        }),
        ("docs", "train-00001.bin", |m| m.train.shards[1].docs -= 1),
        ("tokenizer", "train-00000.bin", |m| {
            m.tokenizer.sha256 = hex(&[8; 32])
        }),
    ];
    for (what, culprit, edit) in cases {
        let mut m = manifest.clone();
        edit(&mut m);
        m.save(&c.dir).unwrap();
        let e = open_err(&c.dir, cfg(1, 8, 0, 0, 1));
        assert!(e.contains(culprit), "{what}: {e}");
    }
    manifest.save(&c.dir).unwrap();
    assert!(Loader::open(&c.dir, "train", cfg(1, 8, 0, 0, 1)).is_ok());
}

#[test]
fn bad_configurations_are_clear_errors() {
    let c = write_corpus("config", &[vec![50, 50]], 1000, 20);
    let e = open_err(&c.dir, cfg(4, 10, 0, 0, 3));
    assert!(e.contains("9 samples") && e.contains("12 samples"), "{e}");
    assert!(open_err(&c.dir, cfg(1, 10, 0, 2, 2)).contains("rank 2"));
    assert!(open_err(&c.dir, cfg(0, 10, 0, 0, 1)).contains("batch"));
    assert!(open_err(&c.dir, cfg(1, 0, 0, 0, 1)).contains("seq_len"));
    assert!(Loader::open(&c.dir, "test", cfg(1, 10, 0, 0, 1)).is_err());
}

// ---- QA ----

fn tiny_tokenizer() -> tokenizers::Tokenizer {
    tokenizer::load(&fixtures::tiny_checkpoint().join("tokenizer.json"), 1 << 20).unwrap()
}

fn qa_cfg(batch: usize, seq_len: usize, pack: bool) -> QaConfig {
    QaConfig {
        batch,
        seq_len,
        seed: 4,
        rank: 0,
        world_size: 1,
        pack,
    }
}

/// Splits every row at its resets and checks each example: the prompt decodes to the
/// template's text, the masked targets to the answer followed by eot, the mask is exactly the
/// answer suffix, padding is unmasked. Returns the questions seen and the examples per row.
fn check_qa_batch(
    b: &QaBatch,
    tok: &tokenizers::Tokenizer,
    pairs: &HashMap<String, String>,
    pad: u32,
    truncated_prompts: bool,
) -> (Vec<String>, Vec<usize>) {
    let eot = tok.token_to_id(tokenizer::EOT).unwrap();
    let (mut questions, mut per_row) = (Vec::new(), Vec::new());
    for r in 0..b.batch {
        let row = r * b.seq_len..(r + 1) * b.seq_len;
        let (inp, tgt) = (&b.inputs[row.clone()], &b.targets[row.clone()]);
        let (mask, resets) = (&b.mask[row.clone()], &b.resets[row]);
        assert!(resets[0], "a row starts with an example");
        let mut starts: Vec<usize> = (0..b.seq_len).filter(|&t| resets[t]).collect();
        // An example ends with its eot target; what follows the last one is padding.
        let last_eot = (0..b.seq_len).rev().find(|&t| mask[t]).unwrap();
        assert_eq!(tgt[last_eot], eot);
        assert!(
            mask[last_eot + 1..].iter().all(|&m| !m),
            "padding is unmasked"
        );
        assert!(
            inp[last_eot + 1..].iter().all(|&t| t == pad),
            "padding inputs"
        );
        assert!(
            tgt[last_eot + 1..].iter().all(|&t| t == pad),
            "padding targets"
        );
        assert!(
            resets[last_eot + 1..].iter().all(|&x| !x),
            "padding has no resets"
        );
        starts.push(last_eot + 1);
        for w in starts.windows(2) {
            let (s, e) = (w[0], w[1]);
            let first_mask = (s..e).find(|&t| mask[t]).expect("an example has an answer");
            assert!(
                mask[first_mask..e].iter().all(|&m| m),
                "the mask is the answer suffix"
            );
            assert_eq!(tgt[e - 1], eot, "an example ends with eot");
            let answer = tokenizer::decode(tok, &tgt[first_mask..e - 1]).unwrap();
            let mut prompt_ids = vec![inp[s]];
            prompt_ids.extend_from_slice(&tgt[s..first_mask]);
            let prompt = tok.decode(&prompt_ids, false).unwrap(); // keeps the QA markers
            let found = pairs
                .iter()
                .find(|(q, a)| **a == answer && QaTemplate::default().render(q).ends_with(&prompt));
            let (q, _) = found.unwrap_or_else(|| panic!("no pair with answer {answer:?}"));
            if !truncated_prompts {
                assert_eq!(prompt, QaTemplate::default().render(q));
            }
            questions.push(q.clone());
        }
        per_row.push(starts.len() - 1);
    }
    (questions, per_row)
}

fn fixture_pairs() -> (Vec<QaPair>, HashMap<String, String>) {
    let pairs = read_qa_jsonl(&fixtures::data().join("qa_train.jsonl")).unwrap();
    let map = pairs
        .iter()
        .map(|p| (p.question.clone(), p.answer.clone()))
        .collect();
    (pairs, map)
}

#[test]
fn qa_masks_cover_exactly_the_answer_and_eot() {
    let (pairs, map) = fixture_pairs();
    assert!(pairs.len() > 500 && pairs[0].extra.contains_key("species"));
    let tok = tiny_tokenizer();
    let eot = tok.token_to_id(tokenizer::EOT).unwrap();
    let mut b =
        QaBatcher::new(&pairs, &tok, &QaTemplate::default(), qa_cfg(4, 1024, false)).unwrap();
    assert_eq!(b.truncated(), 0);
    let mut seen = HashSet::new();
    for _ in 0..b.steps_per_epoch() {
        let batch = b.next_batch().unwrap();
        let (qs, per_row) = check_qa_batch(&batch, &tok, &map, eot, false);
        assert!(
            per_row.iter().all(|&n| n == 1),
            "one example per row without packing"
        );
        for q in qs {
            assert!(seen.insert(q), "an example appears once per epoch");
        }
    }
    assert!(map.len() - seen.len() < 4, "only the tail is dropped");
}

#[test]
fn qa_packing_puts_several_examples_per_row() {
    let (pairs, map) = fixture_pairs();
    let tok = tiny_tokenizer();
    let eot = tok.token_to_id(tokenizer::EOT).unwrap();
    let mut b =
        QaBatcher::new(&pairs, &tok, &QaTemplate::default(), qa_cfg(3, 1024, true)).unwrap();
    assert!(b.rows_per_epoch() < pairs.len() / 2);
    let (mut seen, mut rows) = (HashSet::new(), Vec::new());
    for _ in 0..b.steps_per_epoch() {
        let batch = b.next_batch().unwrap();
        // The tiny tokenizer has no <|pad|>: eot pads.
        let (qs, per_row) = check_qa_batch(&batch, &tok, &map, eot, false);
        rows.extend(per_row);
        for q in qs {
            assert!(seen.insert(q));
        }
    }
    assert!(rows.iter().all(|&n| n >= 2), "{rows:?}");
    assert_eq!(seen.len(), rows.iter().sum::<usize>());
}

#[test]
fn qa_with_the_bundled_bpe_tokenizer_uses_its_markers_and_pad() {
    let (pairs, map) = fixture_pairs();
    let tok = tokenizer::load(&fixtures::tokenizer(), 1 << 20).unwrap();
    let id = |s: &str| tok.token_to_id(s).unwrap();
    let (question, answer, pad) = (
        id(tokenizer::QUESTION),
        id(tokenizer::ANSWER),
        id(tokenizer::PAD),
    );
    assert_ne!(pad, id(tokenizer::EOT));
    let mut b = QaBatcher::new(&pairs, &tok, &QaTemplate::default(), qa_cfg(2, 256, true)).unwrap();
    let mut seen = HashSet::new();
    for _ in 0..b.steps_per_epoch() {
        let batch = b.next_batch().unwrap();
        let (qs, per_row) = check_qa_batch(&batch, &tok, &map, pad, false);
        assert!(per_row.iter().all(|&n| n >= 1));
        seen.extend(qs);
        for t in (0..batch.inputs.len()).filter(|&t| batch.resets[t]) {
            assert_eq!(
                batch.inputs[t],
                question,
                "an example starts with {}",
                tokenizer::QUESTION
            );
        }
        for t in (1..batch.inputs.len()).filter(|&t| batch.mask[t] && !batch.mask[t - 1]) {
            // The prompt ends with "<|answer|> ": the marker is its last or next-to-last token.
            let last_prompt = &batch.inputs[t - 1..=t];
            assert!(last_prompt.contains(&answer), "{last_prompt:?}");
        }
    }
    assert!(seen.len() > pairs.len() * 9 / 10);
    assert!(b.truncated() < pairs.len() / 10);
}

#[test]
fn qa_truncation_cuts_the_prompt_and_keeps_the_answer() {
    let pair = |q: &str, a: &str| QaPair {
        question: q.into(),
        answer: a.into(),
        extra: Default::default(),
    };
    let long_q = "Which clinical signs suggest feline hyperthyroidism in an older cat? ".repeat(4);
    let pairs = vec![
        pair(&long_q, "Weight loss despite a good appetite."),
        pair("Short?", "Yes."),
        pair(
            &format!("{long_q}again"),
            "Tachycardia and a palpable thyroid.",
        ),
    ];
    let map = pairs
        .iter()
        .map(|p| (p.question.clone(), p.answer.clone()))
        .collect();
    let tok = tiny_tokenizer();
    let eot = tok.token_to_id(tokenizer::EOT).unwrap();
    let mut b = QaBatcher::new(&pairs, &tok, &QaTemplate::default(), qa_cfg(3, 64, false)).unwrap();
    assert_eq!(b.truncated(), 2);
    let batch = b.next_batch().unwrap();
    let (qs, _) = check_qa_batch(&batch, &tok, &map, eot, true);
    assert_eq!(qs.len(), 3);
    // The truncated rows are full: the prompt was cut just enough.
    let full = (0..3)
        .filter(|r| batch.mask[r * 64..(r + 1) * 64].last() == Some(&true))
        .count();
    assert_eq!(full, 2);
}

#[test]
fn qa_seek_and_ranks_behave_like_the_loader() {
    let (pairs, _) = fixture_pairs();
    let tok = tiny_tokenizer();
    let t = QaTemplate::default();
    let config = |rank| QaConfig {
        rank,
        world_size: 2,
        ..qa_cfg(2, 512, true)
    };
    let mut a = QaBatcher::new(&pairs, &tok, &t, config(1)).unwrap();
    let spe = a.steps_per_epoch();
    for _ in 0..spe - 2 {
        a.next_batch().unwrap();
    }
    let pos = a.position();
    let want: Vec<QaBatch> = (0..5).map(|_| a.next_batch().unwrap()).collect();
    assert_eq!((want[0].epoch, want[4].epoch), (0, 1));
    let mut b = QaBatcher::new(&pairs, &tok, &t, config(1)).unwrap();
    b.seek(Position { epoch: 3, step: 1 }).unwrap();
    b.seek(pos).unwrap();
    for w in &want {
        assert_eq!(&b.next_batch().unwrap(), w);
    }
    let mut r0 = QaBatcher::new(&pairs, &tok, &t, config(0)).unwrap();
    let mut r1 = QaBatcher::new(&pairs, &tok, &t, config(1)).unwrap();
    let (x, y) = (r0.next_batch().unwrap(), r1.next_batch().unwrap());
    assert_ne!(x.inputs, y.inputs, "ranks get different rows");
}

#[test]
fn qa_bad_input_reports_file_and_line() {
    let dir = scratch("qa-bad");
    let good = r#"{"question": "Q?", "answer": "A."}"#;
    let cases = [
        (
            "malformed",
            format!("{good}\n\n{{\"question\": \"Q\", \n"),
            ":3",
        ),
        (
            "missing",
            format!("{good}\n{{\"question\": \"Q\"}}\n"),
            ":2",
        ),
        (
            "number",
            format!("{{\"question\": 3, \"answer\": \"A\"}}\n{good}\n"),
            ":1",
        ),
        ("array", format!("{good}\n[1, 2]\n"), ":2"),
    ];
    for (name, text, line) in cases {
        let path = dir.join(format!("{name}.jsonl"));
        std::fs::write(&path, text).unwrap();
        let e = format!("{:#}", read_qa_jsonl(&path).unwrap_err());
        assert!(e.contains(&format!("{name}.jsonl{line}")), "{name}: {e}");
    }
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let e = format!("{:#}", read_qa_jsonl(&empty).unwrap_err());
    assert!(e.contains("empty.jsonl"), "{e}");
    assert!(QaTemplate::new("Question: {q}\nAnswer: ").is_err());
    assert!(QaTemplate::new("Q: {question}\nA: ").is_ok());
}
