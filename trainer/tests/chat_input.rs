//! vet-chat's odd inputs (issue 18): flags that did nothing, a file given as --model, negative
//! numbers, absurd thread counts, invalid UTF-8 at the prompt, text that spells special tokens.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use trainer::tokenizer::{self, encode, encode_templated, encode_text, QA_TEMPLATE};

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chat-input-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny() -> String {
    fixtures::tiny_checkpoint().display().to_string()
}

fn vet_chat(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vet-chat"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin).unwrap();
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = vet_chat(args, b"");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    err
}

#[test]
fn flags_that_would_do_nothing_are_refused() {
    let dir = scratch("flags");
    let f = dir.join("questions.jsonl");
    std::fs::write(&f, "{\"question\": \"Is it safe?\"}\n").unwrap();
    let before = std::fs::read(&f).unwrap();
    let (m, fs) = (tiny(), f.to_str().unwrap().to_string());
    let err = fails(&["--model", &m, "--input", &fs, "--output", &fs]);
    assert!(err.contains("same file") && err.contains(&fs), "{err}");
    // Another spelling of the same file.
    let other = format!("{}/./questions.jsonl", dir.display());
    let err = fails(&["--model", &m, "--input", &fs, "--output", &other]);
    assert!(err.contains("same file"), "{err}");
    assert_eq!(std::fs::read(&f).unwrap(), before, "the input file changed");
    let out = dir.join("answers.jsonl");
    let err = fails(&[
        "--model",
        &m,
        "--question",
        "Is it safe?",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("--output") && err.contains("--input"), "{err}");
    assert!(!out.exists());
}

#[test]
fn a_file_given_as_model_is_named_as_a_file() {
    let file = fixtures::tiny_checkpoint().join("config.json");
    let err = fails(&[
        "--model",
        file.to_str().unwrap(),
        "--question",
        "Is it safe?",
    ]);
    assert!(
        err.contains("is a file") && err.contains("checkpoint directory"),
        "{err}"
    );
    assert!(!err.contains("no such directory"), "{err}");
}

#[test]
fn negative_numbers_are_values_not_flags() {
    let m = tiny();
    let err = fails(&[
        "--model",
        &m,
        "--question",
        "Is it safe?",
        "--temperature",
        "-1",
    ]);
    assert!(!err.contains("unexpected argument"), "{err}");
    assert!(err.contains("temperature") && err.contains("-1"), "{err}");
}

#[test]
fn absurd_thread_counts_are_capped_with_a_warning() {
    let m = tiny();
    let args = [
        "--model",
        &m,
        "--tokens",
        "1,2",
        "--greedy",
        "--max-new-tokens",
        "2",
        "--threads",
        "100000",
    ];
    let out = vet_chat(&args, b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: --threads 100000 is far above"),
        "{err}"
    );
}

#[test]
fn a_line_of_invalid_utf8_is_reported_and_the_chat_goes_on() {
    let m = tiny();
    let args = ["--model", &m, "--greedy", "--max-new-tokens", "3"];
    let out = vet_chat(&args, b"Is it \xff\xfe safe?\nIs it safe?\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("line 1 is not valid UTF-8 (bad byte at offset 6): skipped"),
        "{err}"
    );
    // The second line was answered: one timing line.
    assert_eq!(err.matches("stop: ").count(), 1, "{err}");
}

#[test]
fn user_text_never_produces_special_tokens() {
    for (path, specials) in [
        (
            fixtures::tiny_checkpoint().join("tokenizer.json"),
            &["<|endoftext|>"][..],
        ),
        (
            fixtures::tokenizer(),
            &["<|endoftext|>", "<|answer|>", "<|question|>"][..],
        ),
    ] {
        let tok = tokenizer::load(&path, usize::MAX).unwrap();
        for s in specials {
            let id = tok.token_to_id(s).unwrap();
            let question = format!("Is {s} safe?");
            // Encoding the rendered prompt as a whole turns the question's text into the token.
            let whole = encode(&tok, &QA_TEMPLATE.replace("{question}", &question)).unwrap();
            let in_template = QA_TEMPLATE.matches(s).count();
            assert!(whole.iter().filter(|&&t| t == id).count() > in_template);
            let ids = encode_templated(&tok, QA_TEMPLATE, &question).unwrap();
            assert_eq!(ids.iter().filter(|&&t| t == id).count(), in_template, "{s}");
            assert!(!encode_text(&tok, &question).unwrap().contains(&id), "{s}");
            // The text round-trips and a question without specials encodes as before.
            assert_eq!(
                tok.decode(&ids, false).unwrap(),
                QA_TEMPLATE.replace("{question}", &question)
            );
            let plain = QA_TEMPLATE.replace("{question}", "Is it safe?");
            assert_eq!(
                encode_templated(&tok, QA_TEMPLATE, "Is it safe?").unwrap(),
                encode(&tok, &plain).unwrap()
            );
        }
    }
}
