//! `vet-data tokenizer` and `vet-data prepare` read the same inputs: one walk of the folders,
//! one set of extensions (`.txt`, `.jsonl`, each plain, `.gz`, `.zst` or `.zstd`), the same
//! Parquet hint. Both go through `trainer::data::inputs`; this checks it from the outside.

use std::io::Write;
use std::path::{Path, PathBuf};

use trainer::data::manifest::Manifest;
use trainer::data::prepare::{prepare, Options as PrepareOptions};
use trainer::tokenizer_train::{self, Options as TokenizerOptions};

/// A fresh, empty folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("inputs")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

/// A folder tree with one record in each accepted spelling (and a file both must skip);
/// returns the folder and the accepted files' paths relative to it, sorted.
fn corpus_tree(name: &str) -> (PathBuf, Vec<&'static str>) {
    let dir = scratch(name);
    let text = |i: usize| format!("the dog number {i} was vaccinated against rabies\n");
    let json = |i: usize| format!("{{\"text\": \"the cat number {i} had a fever\"}}\n");
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("a.txt", text(1).into_bytes()),
        ("b.jsonl", json(2).into_bytes()),
        ("sub/c.txt.gz", gzip(text(3).as_bytes())),
        ("sub/d.jsonl.zst", zstd(json(4).as_bytes())),
        ("sub/deeper/e.txt.zstd", zstd(text(5).as_bytes())),
        ("sub/F.JSONL.GZ", gzip(json(6).as_bytes())),
    ];
    for (path, bytes) in &files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    std::fs::write(dir.join("sub/notes.md"), "not a corpus file").unwrap();
    let mut names: Vec<&str> = files.iter().map(|f| f.0).collect();
    names.sort();
    (dir, names)
}

#[test]
fn both_commands_walk_folders_and_read_every_accepted_extension() {
    let (dir, names) = corpus_tree("same-files");
    let want: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();

    let listed = tokenizer_train::input_files(std::slice::from_ref(&dir)).unwrap();
    assert_eq!(listed, want, "the tokenizer's file list");
    let opts = TokenizerOptions::new(vec![dir.clone()], 300);
    let (_, stats) = tokenizer_train::train_with_stats(&opts).unwrap();
    assert_eq!(
        (stats.files, stats.texts),
        (6, 6),
        "one text from each file"
    );

    let out = dir.with_file_name("same-files-shards");
    let mut o = PrepareOptions::new(
        vec![dir.clone()],
        fixtures::tiny_checkpoint().join("tokenizer.json"),
        out.clone(),
    );
    o.threads = Some(2);
    let s = prepare(&o).unwrap_or_else(|e| panic!("prepare failed: {e:#}"));
    assert_eq!(s.train_docs + s.val_docs, 6, "one document from each file");
    let (m, _) = Manifest::load(&out).unwrap();
    let sources: Vec<PathBuf> = m.sources.iter().map(|f| PathBuf::from(&f.path)).collect();
    assert_eq!(sources.len(), want.len(), "{sources:?}");
    for (got, want) in sources.iter().zip(&want) {
        assert!(
            want.ends_with(got),
            "prepare read {got:?}, expected {want:?}"
        );
    }
}

#[test]
fn both_commands_refuse_parquet_with_the_same_hint() {
    let dir = scratch("parquet");
    std::fs::write(dir.join("a.jsonl"), "{\"text\": \"a horse\"}\n").unwrap();
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let pq = dir.join("sub/x.parquet.zst");
    std::fs::write(&pq, b"PAR1").unwrap();

    let opts = TokenizerOptions::new(vec![dir.clone()], 300);
    let tok_err = format!("{:#}", tokenizer_train::train(&opts).unwrap_err());
    let o = PrepareOptions::new(
        vec![dir.clone()],
        fixtures::tiny_checkpoint().join("tokenizer.json"),
        dir.with_file_name("parquet-shards"),
    );
    let prep_err = format!("{:#}", prepare(&o).unwrap_err());
    for err in [&tok_err, &prep_err] {
        assert!(
            err.contains("Parquet is not supported")
                && err.contains("x.parquet.zst")
                && err.contains("to_json"),
            "{err}"
        );
    }
}
