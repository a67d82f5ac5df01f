//! `vet-data prepare` and `inspect` on bundled and generated corpora: round trips, determinism
//! across threads, compression, units and parts, resume, bad input and corrupt shards.

use reference::rng::Rng;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use trainer::data::inspect::{inspect_manifest, inspect_shard};
use trainer::data::manifest::Manifest;
use trainer::data::prepare::{prepare, Options, Summary};
use trainer::data::shard::Shard;

const EOT_ID: u32 = 256;

fn tokenizer_path() -> PathBuf {
    fixtures::tiny_checkpoint().join("tokenizer.json")
}

fn corpus_path() -> PathBuf {
    fixtures::data().join("corpus.jsonl")
}

/// A fresh, empty folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("prepare")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn opts(inputs: &[&Path], out: &Path) -> Options {
    let mut o = Options::new(
        inputs.iter().map(|p| p.to_path_buf()).collect(),
        tokenizer_path(),
        out.to_path_buf(),
    );
    o.val_fraction = 0.1;
    o.threads = Some(2);
    o
}

fn run(o: &Options) -> Summary {
    prepare(o).unwrap_or_else(|e| panic!("prepare failed: {e:#}"))
}

/// Every file of a folder and its bytes (not the lock files, one per `--part`).
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .filter(|(name, _)| !name.starts_with(".vet-lock"))
        .collect()
}

fn shards_only(s: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Vec<u8>> {
    s.iter()
        .filter(|(k, _)| k.ends_with(".bin"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The documents of one split, decoded after splitting the tokens at `<|endoftext|>`;
/// checks that the shards' document starts agree with the EOT positions.
fn split_docs(dir: &Path, split: &str) -> Vec<String> {
    let (m, dir) = Manifest::load(dir).unwrap();
    let tok = tokenizers::Tokenizer::from_file(tokenizer_path()).unwrap();
    let mut docs = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for e in &m.split(split).unwrap().shards {
        let shard = Shard::open(&dir.join(&e.file)).unwrap();
        shard.verify().unwrap();
        let mut ids = vec![0u32; shard.len()];
        shard.read_tokens(0, &mut ids);
        let mut eot_starts = vec![0u64];
        for (i, &t) in ids.iter().enumerate() {
            if t == EOT_ID {
                docs.push(tok.decode(&cur, true).unwrap());
                cur.clear();
                if i + 1 < ids.len() {
                    eot_starts.push(i as u64 + 1);
                }
            } else {
                cur.push(t);
            }
        }
        assert_eq!(shard.doc_starts(), eot_starts, "{}", e.file);
    }
    assert!(cur.is_empty(), "{split} ends inside a document");
    docs
}

fn all_docs_sorted(dir: &Path) -> Vec<String> {
    let mut d = split_docs(dir, "train");
    d.extend(split_docs(dir, "val"));
    d.sort();
    d
}

fn corpus_texts() -> Vec<String> {
    let text = std::fs::read_to_string(corpus_path()).unwrap();
    let mut v: Vec<String> = text
        .lines()
        .map(|l| {
            let j: serde_json::Value = serde_json::from_str(l).unwrap();
            j["text"].as_str().unwrap().to_string()
        })
        .collect();
    v.sort();
    v
}

/// `n` documents recombined from the bundled corpus's sentences.
fn generated_docs(seed: u64, n: usize) -> Vec<String> {
    let corpus = corpus_texts();
    let sentences: Vec<&str> = corpus.iter().flat_map(|t| t.split(". ")).collect();
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let k = 1 + rng.below(12) as usize;
            let mut doc = format!("Case {i} (38.5 °C): ");
            for j in 0..k {
                doc.push_str(sentences[rng.below(sentences.len() as u64) as usize]);
                doc.push_str(if j % 4 == 3 { ".\n" } else { ". " });
            }
            doc
        })
        .collect()
}

fn write_jsonl(path: &Path, docs: &[String]) {
    let mut f = std::fs::File::create(path).unwrap();
    for (i, d) in docs.iter().enumerate() {
        let line = serde_json::json!({"text": d, "title": format!("t{i}"), "species": "canine"});
        let bom = if i == 0 { "\u{feff}" } else { "" };
        writeln!(f, "{bom}{line}").unwrap();
    }
}

#[test]
fn bundled_corpus_round_trips_through_shards_each_document_once() {
    let out = scratch("round_trip");
    let corpus = corpus_path();
    let s = run(&opts(&[&corpus], &out));
    let want = corpus_texts();
    assert_eq!(all_docs_sorted(&out), want);
    assert_eq!((s.train_docs + s.val_docs) as usize, want.len());
    assert!(s.val_docs > 0 && s.train_docs > s.val_docs, "{s:?}");
    let (m, _) = Manifest::load(&out).unwrap();
    assert_eq!(m.train.docs + m.val.docs, want.len() as u64);
    assert_eq!(m.tokenizer.eot_id, EOT_ID);
    assert_eq!((m.token_bytes, m.val_fraction, m.split_seed), (2, 0.1, 0));
    assert_eq!(
        m.sources[0].bytes,
        std::fs::metadata(&corpus).unwrap().len()
    );
    assert_eq!(m.skipped.records, 0);
    assert!(s.manifest.is_some() && s.peak_rss_bytes.is_some());
}

#[test]
fn thread_count_does_not_change_a_byte() {
    let corpus = corpus_path();
    let mut snaps = Vec::new();
    for threads in [1, 2] {
        let out = scratch(&format!("threads_{threads}"));
        let mut o = opts(&[&corpus], &out);
        o.threads = Some(threads);
        o.unit_bytes = 64 << 10;
        o.shard_tokens = 20_000;
        let s = run(&o);
        assert!(s.units_total >= 8 && s.shards > 20, "{s:?}");
        snaps.push(snapshot(&out));
    }
    assert_eq!(
        snaps[0].keys().collect::<Vec<_>>(),
        snaps[1].keys().collect::<Vec<_>>()
    );
    assert!(
        snaps[0] == snaps[1],
        "outputs differ between 1 and 2 threads"
    );
}

#[test]
fn gzip_and_zstd_inputs_give_the_same_shards_as_plain() {
    let dir = scratch("compressed");
    let bytes = std::fs::read(corpus_path()).unwrap();
    let plain = dir.join("c.jsonl");
    std::fs::write(&plain, &bytes).unwrap();
    let gz = dir.join("c.jsonl.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&bytes).unwrap();
    std::fs::write(&gz, enc.finish().unwrap()).unwrap();
    let zst = dir.join("c.jsonl.zst");
    std::fs::write(&zst, zstd::encode_all(&bytes[..], 3).unwrap()).unwrap();
    let mut results = Vec::new();
    for (name, input) in [("plain", &plain), ("gz", &gz), ("zst", &zst)] {
        let out = dir.join(format!("out-{name}"));
        let mut o = opts(&[input], &out);
        o.shard_tokens = 50_000;
        run(&o);
        let (m, _) = Manifest::load(&out).unwrap();
        results.push((shards_only(&snapshot(&out)), m.train, m.val));
    }
    assert!(results[0].0.len() > 5);
    assert!(results[0] == results[1], "gzip input gave other shards");
    assert!(results[0] == results[2], "zstd input gave other shards");
}

#[test]
fn resume_keeps_finished_units_and_redoes_only_the_interrupted_one() {
    let out = scratch("resume");
    let corpus = corpus_path();
    let mut o = opts(&[&corpus], &out);
    o.unit_bytes = 64 << 10;
    let first = run(&o);
    assert_eq!((first.units_done, first.units_kept), (first.units_total, 0));
    let before = snapshot(&out);
    // Unit 3 was "in flight": its marker and a shard are gone, a temporary file is left.
    std::fs::remove_file(out.join("unit-000003.json")).unwrap();
    std::fs::remove_file(out.join("train-u000003-0000.bin")).unwrap();
    std::fs::write(out.join("train-u000003-0001.bin.tmp"), b"partial").unwrap();
    // And a unit from a plan with more units than this one.
    std::fs::write(out.join("train-u009999-0000.bin"), b"old").unwrap();
    std::fs::remove_file(out.join("manifest.json")).unwrap();
    let second = run(&o);
    assert_eq!(second.units_done, 1);
    assert_eq!(second.units_kept, first.units_total - 1);
    assert!(snapshot(&out) == before, "resumed output differs");
    // A corrupted shard (size changed) also invalidates its unit.
    let victim = out.join("train-u000001-0000.bin");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes.truncate(bytes.len() - 8);
    std::fs::write(&victim, bytes).unwrap();
    let third = run(&o);
    assert_eq!(third.units_done, 1);
    assert!(snapshot(&out) == before, "redone unit differs");
    // Other options make every marker stale.
    o.seed = 7;
    assert_eq!(run(&o).units_done, first.units_total);
}

#[test]
fn parts_then_merge_match_a_single_run() {
    let dir = scratch("parts");
    let input = dir.join("gen.jsonl");
    write_jsonl(&input, &generated_docs(11, 600));
    let single = dir.join("single");
    let mut o = opts(&[&input], &single);
    o.unit_bytes = 40 << 10;
    let full = run(&o);
    assert!(full.units_total >= 4, "{full:?}");

    let parted = dir.join("parted");
    let mut p = o.clone();
    p.out = parted.clone();
    p.part = Some((0, 2));
    let s0 = run(&p);
    assert!(s0.manifest.is_none());
    assert_eq!(s0.missing_units.len(), full.units_total / 2);
    let mut merge = p.clone();
    merge.part = None;
    merge.merge_only = true;
    let err = format!("{:#}", prepare(&merge).unwrap_err());
    assert!(err.contains("unit 1 ") && err.contains("not done"), "{err}");
    p.part = Some((1, 2));
    let s1 = run(&p);
    assert!(s1.manifest.is_some(), "the last part writes the manifest");
    assert!(
        snapshot(&single) == snapshot(&parted),
        "parts differ from one run"
    );
    std::fs::remove_file(parted.join("manifest.json")).unwrap();
    let m = run(&merge);
    assert_eq!(m.units_done, 0);
    assert!(
        snapshot(&single) == snapshot(&parted),
        "merge-only differs from one run"
    );
}

#[test]
fn a_large_jsonl_cut_into_many_units_gives_the_same_documents_as_one_unit() {
    let dir = scratch("units");
    let input = dir.join("big.jsonl");
    write_jsonl(&input, &generated_docs(5, 1500));
    let mut per_split = Vec::new();
    for (name, unit_bytes) in [("one", 64u64 << 20), ("many", 7_777)] {
        let out = dir.join(name);
        let mut o = opts(&[&input], &out);
        o.unit_bytes = unit_bytes;
        let s = run(&o);
        assert_eq!(s.units_total > 100, name == "many", "{s:?}");
        let mut train = split_docs(&out, "train");
        let mut val = split_docs(&out, "val");
        train.sort();
        val.sort();
        per_split.push((train, val));
    }
    assert_eq!(per_split[0].0.len() + per_split[0].1.len(), 1500);
    assert!(
        per_split[0] == per_split[1],
        "unit size changed the documents or the split"
    );
}

fn bad_input(dir: &Path) -> PathBuf {
    let path = dir.join("bad.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    let docs = generated_docs(3, 40);
    for (i, d) in docs.iter().enumerate() {
        writeln!(f, "{}", serde_json::json!({ "text": d })).unwrap();
        match i {
            10 => writeln!(f, "{{\"text\": \"unterminated").unwrap(),
            20 => f.write_all(b"{\"text\": \"bad \xff byte\"}\n").unwrap(),
            30 => writeln!(f, "{{\"title\": \"no text field\"}}").unwrap(),
            35 => writeln!(f, "{{\"text\": 42}}").unwrap(),
            _ => {}
        }
    }
    path
}

#[test]
fn bad_records_are_skipped_and_counted_with_file_and_line_or_fatal_when_strict() {
    let dir = scratch("bad_input");
    let input = bad_input(&dir);
    let out = dir.join("out");
    let mut o = opts(&[&input], &out);
    o.unit_bytes = 4 << 10; // bad lines land in later units: line numbers must still be right
    let s = run(&o);
    assert_eq!(s.skipped, 4);
    assert_eq!(s.train_docs + s.val_docs, 40);
    let name = input.display().to_string();
    let ex = &s.skipped_examples;
    assert!(
        ex[0].starts_with(&format!("{name}:12: malformed JSON")),
        "{ex:?}"
    );
    assert!(
        ex[1].starts_with(&format!("{name}:23: invalid UTF-8")),
        "{ex:?}"
    );
    assert_eq!(ex[2], format!("{name}:34: no field \"text\""));
    assert_eq!(
        ex[3],
        format!("{name}:40: field \"text\" is a number, not a string")
    );
    let (m, _) = Manifest::load(&out).unwrap();
    assert_eq!((m.skipped.records, &m.skipped.examples), (4, ex));

    o.strict = true;
    o.out = dir.join("strict");
    let err = format!("{:#}", prepare(&o).unwrap_err());
    assert!(err.contains(&format!("{name}:12: malformed JSON")), "{err}");
    assert!(!o.out.join("manifest.json").exists());
}

#[test]
fn txt_documents_long_ones_and_compressed_ones_round_trip() {
    let dir = scratch("txt");
    let input = dir.join("in");
    std::fs::create_dir_all(input.join("sub")).unwrap();
    let docs = generated_docs(9, 4000);
    let small = docs[0].clone();
    // Longer than a tokenizer piece (1 MB) and than a shard: read twice, split over shards.
    let long = docs.join("\n");
    let no_breaks = "é".repeat(2_500_000);
    let with_eot = format!("before <|endoftext|> after {}", docs[1]);
    std::fs::write(input.join("a.txt"), &small).unwrap();
    std::fs::write(input.join("sub/b.txt"), &long).unwrap();
    std::fs::write(input.join("sub/c.txt"), &no_breaks).unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(with_eot.as_bytes()).unwrap();
    std::fs::write(input.join("d.txt.gz"), enc.finish().unwrap()).unwrap();
    std::fs::write(input.join("notes.csv"), "ignored").unwrap();
    let mut bad = long.clone().into_bytes();
    let at = bad.len() - 10;
    bad[at] = 0xff;
    std::fs::write(input.join("e.txt"), &bad).unwrap();
    let out = dir.join("out");
    let mut o = opts(&[&input], &out);
    o.shard_tokens = 300_000;
    let s = run(&o);
    let mut want = vec![small, long.clone(), no_breaks, with_eot];
    want.sort();
    assert_eq!(s.skipped, 1);
    // The line holding the bad byte (1-based).
    let lines = 1 + long.as_bytes()[..at]
        .iter()
        .filter(|&&b| b == b'\n')
        .count();
    let e = input.join("e.txt").display().to_string();
    assert_eq!(s.skipped_examples, [format!("{e}:{lines}: invalid UTF-8")]);
    // A document longer than a shard is split; each continuation shard starts a "document".
    let (m, _) = Manifest::load(&out).unwrap();
    let split = if m.train.tokens > long.len() as u64 {
        &m.train
    } else {
        &m.val
    };
    assert!(split.shards.len() >= long.len() / 300_000);
    let mut got: Vec<String> = all_docs_sorted(&out);
    got.sort();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "txt documents did not round-trip");
}

#[test]
fn a_corrupt_gzip_stream_is_reported_with_its_file() {
    let dir = scratch("corrupt_gz");
    let bytes = std::fs::read(corpus_path()).unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&bytes).unwrap();
    let gz = enc.finish().unwrap();
    let input = dir.join("cut.jsonl.gz");
    std::fs::write(&input, &gz[..gz.len() / 2]).unwrap();
    let mut o = opts(&[&input], &dir.join("out"));
    let s = run(&o);
    assert_eq!(s.skipped, 1);
    let name = input.display().to_string();
    assert!(s.skipped_examples[0].starts_with(&format!("{name}: corrupt or truncated gzip")));
    assert!(s.train_docs > 10, "documents before the damage are kept");
    o.strict = true;
    o.out = dir.join("strict");
    let err = format!("{:#}", prepare(&o).unwrap_err());
    assert!(err.contains(&name) && err.contains("gzip"), "{err}");
}

#[test]
fn parquet_a_tokenizer_without_eot_and_bad_options_are_clear_errors() {
    let dir = scratch("refusals");
    let pq = dir.join("x.parquet");
    std::fs::write(&pq, b"PAR1").unwrap();
    let err = format!("{:#}", prepare(&opts(&[&pq], &dir.join("o1"))).unwrap_err());
    assert!(
        err.contains("Parquet is not supported") && err.contains("x.parquet"),
        "{err}"
    );

    let tok = trainer::tokenizer::byte_level().unwrap();
    let tok_path = dir.join("no-eot.json");
    let mut bare = tokenizers::Tokenizer::new(tok.get_model().clone());
    bare.with_pre_tokenizer(tok.get_pre_tokenizer().cloned());
    bare.save(&tok_path, false).unwrap();
    let corpus = corpus_path();
    let mut o = opts(&[&corpus], &dir.join("o2"));
    o.tokenizer = tok_path;
    let err = format!("{:#}", prepare(&o).unwrap_err());
    assert!(
        err.contains("no <|endoftext|>") && err.contains("no-eot.json"),
        "{err}"
    );

    let mut o = opts(&[&corpus], &dir.join("o3"));
    o.val_fraction = 1.5;
    assert!(format!("{:#}", prepare(&o).unwrap_err()).contains("--val-fraction"));
    let blocker = dir.join("file");
    std::fs::write(&blocker, b"").unwrap();
    let err = format!(
        "{:#}",
        prepare(&opts(&[&corpus], &blocker.join("out"))).unwrap_err()
    );
    assert!(err.contains("output folder"), "{err}");
}

#[test]
fn inspect_verifies_a_manifest_and_names_truncated_and_flipped_shards() {
    let out = scratch("inspect");
    let corpus = corpus_path();
    let mut o = opts(&[&corpus], &out);
    o.shard_tokens = 60_000;
    run(&o);
    let ok = inspect_manifest(&out).unwrap();
    assert!(
        ok.failures.is_empty() && ok.checked > 5,
        "{:?}",
        ok.failures
    );
    let first = out.join("train-u000000-0000.bin");
    let r = inspect_shard(&first, Some(&tokenizer_path()), 50).unwrap();
    let docs = r.docs.unwrap();
    assert!(docs.min <= docs.max && docs.mean > 100.0);
    assert!(corpus_texts()
        .iter()
        .any(|t| t.starts_with(r.sample.as_deref().unwrap())));
    let other_tok = out.join("other-tokenizer.json");
    std::fs::write(&other_tok, b"{}").unwrap();
    let err = format!(
        "{:#}",
        inspect_shard(&first, Some(&other_tok), 50).unwrap_err()
    );
    assert!(err.contains("is not the one shard"), "{err}");

    let truncated = out.join("train-u000000-0001.bin");
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let flipped = out.join("train-u000000-0002.bin");
    let mut bytes = std::fs::read(&flipped).unwrap();
    bytes[1000] ^= 0x10;
    std::fs::write(&flipped, &bytes).unwrap();
    let bad = inspect_manifest(&out).unwrap();
    assert_eq!(bad.failures.len(), 2, "{:?}", bad.failures);
    assert!(
        bad.failures[0].contains("train-u000000-0001.bin") && bad.failures[0].contains("truncated")
    );
    assert!(
        bad.failures[1].contains("train-u000000-0002.bin") && bad.failures[1].contains("checksum")
    );
    for f in [&truncated, &flipped] {
        let err = format!("{:#}", inspect_shard(f, None, 10).unwrap_err());
        assert!(err.contains(&f.display().to_string()), "{err}");
    }
}

/// Documents mixing everything the pre-tokenizer treats specially.
fn tricky_docs(seed: u64, n: usize) -> Vec<String> {
    let frags = [
        " ",
        "  ",
        "   ",
        "\n",
        "\n\n",
        "\r\n",
        "\t",
        " \t ",
        "\u{a0}",
        "\u{2009}",
        "\u{3000}",
        "\u{85}",
        "\x0b",
        "\x0c",
        "\x1f",
        "dog",
        "Cat",
        " the",
        "don't",
        "I'll",
        "we've",
        "'s",
        "'",
        "''",
        "38.5",
        " 120",
        "mg/kg",
        "°C",
        "µg",
        "é",
        "naïve",
        "e\u{301}",
        "🐶",
        "犬",
        "٣",
        "Ⅻ",
        "<|endoftext|>",
        "(",
        ")",
        "...",
        "--",
        " -",
        "!",
        "\u{200b}",
    ];
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            (0..1 + rng.below(60) as usize)
                .map(|_| frags[rng.below(frags.len() as u64) as usize])
                .collect()
        })
        .collect()
}

#[test]
fn the_fast_tokenizer_path_writes_the_same_shards_as_the_tokenizers_pipeline() {
    let dir = scratch("fast_path");
    let input = dir.join("tricky.jsonl");
    let mut docs = tricky_docs(21, 3000);
    docs.extend(generated_docs(22, 300));
    write_jsonl(&input, &docs);
    let corpus = corpus_path();
    let bpe = fixtures::root().join("tokenizer").join("tokenizer.json");
    let mut tokenizers = vec![tokenizer_path()];
    if bpe.is_file() {
        tokenizers.push(bpe);
    }
    for (t, tok) in tokenizers.iter().enumerate() {
        let mut outs = Vec::new();
        for slow in [false, true] {
            let out = dir.join(format!("out-{t}-{slow}"));
            let mut o = opts(&[&input, &corpus], &out);
            o.tokenizer = tok.clone();
            o.slow_tokenizer = slow;
            run(&o);
            outs.push(shards_only(&snapshot(&out)));
        }
        assert!(!outs[0].is_empty());
        assert!(
            outs[0] == outs[1],
            "fast and full tokenization differ with {}",
            tok.display()
        );
    }
}
