//! `vet-data tokenizer` (trainer::tokenizer_train) and the bundled fixtures tokenizer.

use reference::rng::Rng;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::Tokenizer;
use trainer::tokenizer::{self, SPECIAL_TOKENS};
use trainer::tokenizer_train::{self, Options, Ratio, BYTE_TOKENS};

/// Bytes per token the bundled tokenizer must reach on the held-out QA questions (qa_eval, never
/// seen in training). Measured 4.33 (7780 bytes -> 1795 tokens; 4096-token tokenizer); byte level
/// is 1.0. The bound leaves ~8% for a retrained corpus and fails a broken or stale merge table.
const BUNDLED_MIN_BYTES_PER_TOKEN: f64 = 4.0;

/// A fresh, empty scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vet-tokenizer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating scratch folder");
    dir
}

const WORDS: [&str; 32] = [
    "the",
    "dog",
    "cat",
    "horse",
    "cattle",
    "ewe",
    "sow",
    "hen",
    "rabbit",
    "with",
    "fever",
    "vomiting",
    "lameness",
    "parvovirus",
    "mastitis",
    "colic",
    "vaccination",
    "clinical",
    "signs",
    "include",
    "diarrhoea",
    "and",
    "of",
    "treatment",
    "supportive",
    "fluids",
    "is",
    "diagnosis",
    "laminitis",
    "herd",
    "owner",
    "examination",
];

/// Writes `lines` seeded pseudo-veterinary sentences (ASCII only) as `{"text": ...}` records.
fn seeded_corpus(dir: &Path, seed: u64, lines: usize) -> PathBuf {
    let mut rng = Rng::new(seed);
    let path = dir.join("corpus.jsonl");
    let mut f = std::fs::File::create(&path).expect("creating corpus");
    for _ in 0..lines {
        let n = 5 + rng.below(20) as usize;
        let words: Vec<&str> = (0..n)
            .map(|_| WORDS[rng.below(WORDS.len() as u64) as usize])
            .collect();
        let text = format!("{}.", words.join(" "));
        let rec = serde_json::json!({ "text": text, "title": "t", "species": "dog" });
        writeln!(f, "{rec}").expect("writing corpus");
    }
    path
}

fn small_options(dir: &Path, vocab_size: usize) -> Options {
    Options::new(vec![seeded_corpus(dir, 42, 2000)], vocab_size)
}

fn json(tok: &Tokenizer) -> String {
    tok.to_string(true).expect("serialising tokenizer")
}

fn bundled() -> Tokenizer {
    tokenizer::load(&fixtures::tokenizer(), 4096).expect("loading the bundled tokenizer")
}

/// The options `fixtures/data/README.md` gives for the bundled tokenizer.
fn bundled_options() -> Options {
    let mut opts = Options::new(vec![fixtures::corpus(), fixtures::qa_train()], 4096);
    opts.fields = ["text", "question", "answer"].map(String::from).to_vec();
    opts
}

/// Special tokens at ids 0.., then the 256 ByteLevel byte chars, for a tokenizer of `specials`.
fn assert_layout(tok: &Tokenizer, specials: &[&str]) {
    for (id, s) in specials.iter().enumerate() {
        assert_eq!(tok.token_to_id(s), Some(id as u32), "special token {s}");
    }
    let alphabet = ByteLevel::alphabet();
    let first = specials.len() as u32;
    for id in first..first + BYTE_TOKENS as u32 {
        let token = tok.id_to_token(id).unwrap_or_default();
        let mut chars = token.chars();
        let c = chars.next().unwrap_or('\0');
        assert!(
            chars.next().is_none() && alphabet.contains(&c),
            "id {id} is {token:?}, want one byte token"
        );
    }
    for c in alphabet {
        assert!(
            tok.token_to_id(&c.to_string()).is_some(),
            "byte char {c:?} missing"
        );
    }
}

#[test]
fn small_corpus_gives_the_requested_vocab_with_special_tokens_first() {
    let dir = scratch("vocab");
    let tok = tokenizer_train::train(&small_options(&dir, 400)).expect("training");
    assert_eq!(tok.get_vocab_size(true), 400);
    assert_layout(&tok, &SPECIAL_TOKENS);
    // The merges learn the corpus: some of its words become single tokens, and its text
    // compresses well past one byte per token.
    let single = WORDS
        .iter()
        .filter(|w| tokenizer::encode(&tok, &format!(" {w}")).unwrap().len() == 1)
        .count();
    assert!(single >= 5, "only {single} corpus words are single tokens");
    let text = std::fs::read_to_string(dir.join("corpus.jsonl")).unwrap();
    let words: String = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
                + "\n"
        })
        .collect();
    let ratio = words.len() as f64 / tokenizer::encode(&tok, &words).unwrap().len() as f64;
    assert!(ratio >= 2.5, "{ratio:.2} bytes/token");
}

#[test]
fn extra_special_tokens_follow_the_builtin_ones() {
    let dir = scratch("extra");
    let mut opts = small_options(&dir, 300);
    opts.extra_special = vec!["<|system|>".to_string()];
    let tok = tokenizer_train::train(&opts).expect("training");
    let mut specials = SPECIAL_TOKENS.to_vec();
    specials.push("<|system|>");
    assert_layout(&tok, &specials);
    assert_eq!(tok.get_vocab_size(true), 300);
}

#[test]
fn every_text_round_trips_even_bytes_the_corpus_never_had() {
    let dir = scratch("roundtrip");
    // ASCII-only training text: every other byte comes from the initial alphabet alone.
    let tok = tokenizer_train::train(&small_options(&dir, 320)).expect("training");
    let mut texts: Vec<String> = [
        "Canine parvovirus: fever 39.5 °C, vomiting.",
        "Käse, naïve café, Straße, ñandú, Ærø, żółw",
        "犬のパルボウイルス感染症 и кошка, κτηνίατρος",
        "🐶🐱🐴🐄🐑🐖🐔🐰🦎 emoji, ZWJ: 👩‍⚕️ flags 🇬🇧",
        "tabs\tand\r\nCRLF\u{0}NUL\u{7f}DEL\u{80}\u{ff}\u{fffd}\u{10ffff}",
        "   leading spaces, trailing   ",
        "",
    ]
    .map(String::from)
    .to_vec();
    // Every char U+0000..U+00FF in one string: every one- and two-byte UTF-8 sequence start.
    texts.push((0u32..256).filter_map(char::from_u32).collect());
    // Seeded random strings over the whole code space.
    let mut rng = Rng::new(7);
    for _ in 0..200 {
        let len = rng.below(40) as usize;
        let s: String = (0..len)
            .filter_map(|_| char::from_u32((rng.next_u64() % 0x11_0000) as u32))
            .collect();
        texts.push(s);
    }
    for text in &texts {
        let ids = tokenizer::encode(&tok, text).expect("encoding");
        assert!(ids
            .iter()
            .all(|&id| (id as usize) < tok.get_vocab_size(true)));
        let back = tokenizer::decode(&tok, &ids).expect("decoding");
        assert_eq!(&back, text, "round trip of {text:?} via {ids:?}");
    }
}

#[test]
fn training_twice_gives_identical_bytes() {
    let dir = scratch("twice");
    let opts = small_options(&dir, 400);
    let a = json(&tokenizer_train::train(&opts).expect("training"));
    let b = json(&tokenizer_train::train(&opts).expect("training again"));
    assert!(a == b, "two trainings on the same corpus differ");
}

#[test]
fn special_tokens_in_the_text_are_not_merged_into_words() {
    let dir = scratch("specials_in_text");
    let path = dir.join("eot.txt");
    let line = "the dog<|endoftext|>the cat<|endoftext|>\n".repeat(500);
    std::fs::write(&path, line).expect("writing");
    let tok = tokenizer_train::train(&Options::new(vec![path], 300)).expect("training");
    let learned: Vec<String> = (SPECIAL_TOKENS.len() as u32..300)
        .filter_map(|id| tok.id_to_token(id))
        .filter(|t| t.contains("endof") || t.contains("<|"))
        .collect();
    assert!(
        learned.is_empty(),
        "merges learned from special tokens: {learned:?}"
    );
}

#[test]
fn vocab_size_without_room_for_merges_is_an_error() {
    let dir = scratch("too_small");
    for vocab_size in [0, 256, 260] {
        let err = tokenizer_train::train(&small_options(&dir, vocab_size))
            .expect_err("no room for merges must fail");
        let msg = err.to_string();
        assert!(
            msg.contains("260") && msg.contains(&vocab_size.to_string()),
            "{msg}"
        );
    }
    let tok = tokenizer_train::train(&small_options(&dir, 261)).expect("one merge");
    assert_eq!(tok.get_vocab_size(true), 261);
}

#[test]
fn bad_inputs_are_errors_naming_the_file() {
    let dir = scratch("bad_inputs");
    let missing = dir.join("missing.jsonl");
    let err = tokenizer_train::train(&Options::new(vec![missing.clone()], 300)).unwrap_err();
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    let no_field = dir.join("qa.jsonl");
    std::fs::write(&no_field, "{\"text\": \"a b\"}\n{\"question\": \"q?\"}\n").unwrap();
    let err = tokenizer_train::train(&Options::new(vec![no_field.clone()], 300)).unwrap_err();
    let want = format!("{}:2", no_field.display());
    assert!(format!("{err:#}").contains(&want), "{err:#}");

    let not_json = dir.join("broken.jsonl");
    std::fs::write(&not_json, "{\"text\": \"a\"}\n{not json\n").unwrap();
    let err = tokenizer_train::train(&Options::new(vec![not_json.clone()], 300)).unwrap_err();
    assert!(
        format!("{err:#}").contains(&format!("{}:2", not_json.display())),
        "{err:#}"
    );

    let wrong_kind = dir.join("notes.md");
    std::fs::write(&wrong_kind, "text").unwrap();
    let err = tokenizer_train::train(&Options::new(vec![wrong_kind], 300)).unwrap_err();
    assert!(err.to_string().contains("notes.md"), "{err}");
}

#[test]
fn folders_are_walked_in_sorted_order() {
    let dir = scratch("walk");
    std::fs::create_dir_all(dir.join("b")).unwrap();
    std::fs::write(dir.join("b/2.txt"), "x\n").unwrap();
    std::fs::write(dir.join("a.jsonl"), "{\"text\": \"y\"}\n").unwrap();
    std::fs::write(dir.join("README.md"), "skipped").unwrap();
    let files = tokenizer_train::input_files(std::slice::from_ref(&dir)).unwrap();
    assert_eq!(files, vec![dir.join("a.jsonl"), dir.join("b/2.txt")]);
}

#[test]
fn saved_tokenizer_reloads_and_a_smaller_model_vocabulary_is_rejected() {
    let tok = bundled();
    assert_eq!(tok.get_vocab_size(true), 4096);
    let err = tokenizer::load(&fixtures::tokenizer(), 1000).expect_err("1000 rows < 4096 tokens");
    let msg = err.to_string();
    assert!(msg.contains("4096") && msg.contains("1000"), "{msg}");
}

#[test]
fn bundled_tokenizer_has_4096_tokens_in_the_documented_layout() {
    let tok = bundled();
    assert_eq!(tok.get_vocab_size(true), 4096);
    assert_layout(&tok, &SPECIAL_TOKENS);
    let ids =
        tokenizer::encode(&tok, "<|question|> Why?\n<|answer|> Because.<|endoftext|>").unwrap();
    assert_eq!(ids[0], 2);
    assert_eq!(*ids.last().unwrap(), 0);
}

#[test]
fn bundled_tokenizer_is_what_the_documented_command_produces() {
    let trained = json(&tokenizer_train::train(&bundled_options()).expect("training"));
    let bundled = std::fs::read_to_string(fixtures::tokenizer()).expect("reading bundled");
    assert!(
        trained == bundled,
        "fixtures/tokenizer/tokenizer.json is stale: regenerate it (fixtures/data/README.md)"
    );
}

#[test]
fn bundled_tokenizer_compresses_held_out_questions() {
    let tok = bundled();
    let text = std::fs::read_to_string(fixtures::qa_eval()).unwrap();
    let mut ratio = Ratio::default();
    for line in text.lines() {
        let rec: serde_json::Value = serde_json::from_str(line).unwrap();
        ratio.add(&tok, rec["question"].as_str().unwrap()).unwrap();
    }
    let bpt = ratio.bytes_per_token();
    println!(
        "qa_eval questions: {} bytes, {} tokens, {bpt:.3} bytes/token",
        ratio.bytes, ratio.tokens
    );
    assert!(
        bpt >= BUNDLED_MIN_BYTES_PER_TOKEN,
        "bundled tokenizer: {bpt:.3} bytes/token on qa_eval questions, want ≥ {BUNDLED_MIN_BYTES_PER_TOKEN}"
    );
}

fn vet_data(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vet-data"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running vet-data")
}

#[test]
fn cli_trains_a_tokenizer_end_to_end() {
    let dir = scratch("cli");
    let input = dir.join("tiny.txt");
    std::fs::write(
        &input,
        "The dog has a fever.\nThe cat has a fever too.\n".repeat(40),
    )
    .unwrap();
    let out = dir.join("nested/tokenizer.json");
    let run = vet_data(&[
        "tokenizer",
        "--input",
        input.to_str().unwrap(),
        "--vocab-size",
        "300",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("bytes/token"), "{stdout}");
    // Another process, other hash seeds: still the same bytes as in-process training.
    let tok = tokenizer::load(&out, 300).expect("reloading the CLI's tokenizer");
    assert!(tok.get_vocab_size(true) <= 300);
    let again = tokenizer_train::train(&Options::new(vec![input], 300)).unwrap();
    assert!(std::fs::read_to_string(&out).unwrap() == json(&again));
}

#[test]
fn cli_rejects_a_vocab_size_without_room_for_merges() {
    let dir = scratch("cli_small");
    let input = dir.join("tiny.txt");
    std::fs::write(&input, "The dog has a fever.\n").unwrap();
    let out = dir.join("tokenizer.json");
    let run = vet_data(&[
        "tokenizer",
        "--input",
        input.to_str().unwrap(),
        "--vocab-size",
        "260",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("vocab size 260"), "{stderr}");
    assert!(!out.exists(), "nothing is written on error");
}
