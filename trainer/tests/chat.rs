//! `vet-chat` on the bundled tiny byte-level checkpoint: state carried between turns equals
//! re-reading the history, `--tokens` equals argmax over full forwards, stop strings, UTF-8
//! streaming, seeds, batch mode with resume, the interactive loop, and bad input. (The
//! allocation-free decode loop is checked in `chat_alloc.rs`.)

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use reference::model::{forward, Batch};
use reference::rng::Rng;
use reference::State;
use trainer::chat::{ChatConfig, Session, StopReason};
use trainer::checkpoint;
use trainer::data::qa::QaTemplate;
use trainer::generate::Sampling;
use trainer::tokenizer::{self, encode};

// ---- helpers ----

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chat-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny() -> PathBuf {
    fixtures::tiny_checkpoint()
}

/// A veterinary-sounding question drawn from `seed`.
fn question(seed: u64) -> String {
    const SPECIES: [&str; 6] = ["dog", "cat", "ewe", "horse", "rabbit", "calf"];
    const SIGNS: [&str; 6] = [
        "fever",
        "lameness",
        "diarrhoea",
        "a cough",
        "weight loss",
        "itchy skin",
    ];
    let mut r = Rng::new(seed);
    let s = SPECIES[r.below(6) as usize];
    let g = SIGNS[r.below(6) as usize];
    format!("What should I do for a {s} with {g}?")
}

fn greedy(max_new_tokens: usize) -> Sampling {
    Sampling {
        max_new_tokens,
        ..Sampling::default()
    }
}

fn session(sampling: Sampling, stops: &[&str]) -> Session {
    let ck = checkpoint::load(&tiny()).unwrap();
    let tok = tokenizer::load(&tiny().join("tokenizer.json"), ck.config.vocab_size).unwrap();
    let engine = trainer::device::engine("reference", &ck.config, ck.params).unwrap();
    let cfg = ChatConfig {
        sampling,
        stop_strings: stops.iter().map(|s| s.to_string()).collect(),
        template: QaTemplate::default(),
    };
    Session::new(engine, tok, cfg).unwrap()
}

/// Greedy continuation of `prefix` by `n` tokens, each from a fresh full forward over the
/// whole sequence so far (no state, no step, no sampler).
fn argmax_by_full_forward(prefix: &[u32], n: usize) -> Vec<u32> {
    let ck = checkpoint::load(&tiny()).unwrap();
    let v = ck.config.vocab_size;
    let mut seq = prefix.to_vec();
    for _ in 0..n {
        let (logits, _, _) = forward(
            &ck.config,
            &ck.params,
            &Batch::new(&seq, 1, seq.len()),
            None,
            false,
        )
        .unwrap();
        let last = &logits.data[(seq.len() - 1) * v..];
        let mut best = 0;
        for i in 1..v {
            if last[i] > last[best] {
                best = i;
            }
        }
        seq.push(best as u32);
    }
    seq[prefix.len()..].to_vec()
}

fn vet_chat(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vet-chat"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs vet-chat expecting failure; returns stderr.
fn fails(args: &[&str]) -> String {
    let out = vet_chat(args, None);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    err
}

fn succeeds(args: &[&str], stdin: Option<&str>) -> (String, String) {
    let out = vet_chat(args, stdin);
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{args:?} failed: {e}");
    (o, e)
}

/// A copy of the tiny checkpoint in a scratch folder.
fn tiny_copy(name: &str) -> PathBuf {
    let dir = scratch(name).join("ck");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny().join(f), dir.join(f)).unwrap();
    }
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---- the model state between turns ----

#[test]
fn second_turn_from_the_kept_state_equals_rereading_the_whole_history() {
    let tok = tokenizer::load(&tiny().join("tokenizer.json"), 264).unwrap();
    let eot = tok.token_to_id(tokenizer::EOT).unwrap();
    let template = QaTemplate::default();
    for seed in [1, 2] {
        let (q1, q2) = (question(seed), question(seed + 100));
        let mut chat = session(greedy(14), &[]);
        let a1 = chat.ask(&q1, &mut Vec::new()).unwrap();
        let a2 = chat.ask(&q2, &mut Vec::new()).unwrap();
        // The history the second turn continues, built independently of the session.
        let mut history = encode(&tok, &template.render(&q1)).unwrap();
        history.extend(&a1.tokens);
        if a1.stop != StopReason::EndOfText {
            history.push(eot);
        }
        let p2 = encode(&tok, &template.render(&q2)).unwrap();
        // Turn 2 prefilled only its question, after the answer's last token (which decoding
        // never feeds to the model) and the end token the session appended.
        let appended = usize::from(a1.stop != StopReason::EndOfText);
        assert_eq!(a2.prompt_tokens, 1 + appended + p2.len());
        history.extend(&p2);
        assert_eq!(&chat.history()[..history.len()], &history[..]);
        let want = argmax_by_full_forward(&history, a2.tokens.len());
        assert_eq!(
            a2.tokens, want,
            "seed {seed}: carried state != re-read history"
        );
    }
}

#[test]
fn prefill_through_carried_state_is_bit_identical_to_one_forward() {
    // The reference promises the same bits when a sequence is split and chained through the
    // state, so the logits must be equal, not merely close.
    let ck = checkpoint::load(&tiny()).unwrap();
    let mut engine = trainer::device::engine("reference", &ck.config, ck.params).unwrap();
    let mut r = Rng::new(7);
    let seq: Vec<u32> = (0..61).map(|_| r.below(264) as u32).collect();
    let v = 264;
    let mut logits = vec![0.0f32; v];
    let mut state = State::zeros(&ck.config, 1);
    for chunk in [&seq[..23], &seq[23..24], &seq[24..]] {
        engine.prefill(chunk, &mut state, &mut logits).unwrap();
    }
    let (whole, whole_state) = engine
        .forward(&Batch::new(&seq, 1, seq.len()), None)
        .unwrap();
    assert_eq!(&logits[..], &whole.data[(seq.len() - 1) * v..]);
    assert_eq!(state, whole_state);
}

#[test]
fn reset_starts_the_conversation_over() {
    let mut chat = session(greedy(10), &[]);
    let first = chat.ask(&question(3), &mut Vec::new()).unwrap();
    chat.ask(&question(4), &mut Vec::new()).unwrap();
    assert_eq!(chat.turns(), 2);
    chat.reset().unwrap();
    assert!(chat.history().is_empty());
    let again = chat.ask(&question(3), &mut Vec::new()).unwrap();
    assert_eq!(again.tokens, first.tokens);
    assert_eq!(again.prompt_tokens, first.prompt_tokens);
}

/// Output that raises the session's interrupt flag once it has received `after` bytes, as a
/// Ctrl-C in the middle of an answer would.
struct InterruptAfter {
    flags: std::sync::Arc<trainer::chat::Interrupt>,
    after: usize,
    got: Vec<u8>,
}

impl Write for InterruptAfter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.got.extend_from_slice(b);
        if self.got.len() >= self.after {
            self.flags
                .stop
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn an_interrupt_ends_the_answer_and_the_conversation_goes_on() {
    let q = question(30);
    let mut chat = session(greedy(60), &[]);
    let mut out = InterruptAfter {
        flags: chat.interrupt(),
        after: 5,
        got: Vec::new(),
    };
    let a = chat.ask(&q, &mut out).unwrap();
    assert_eq!(a.stop, StopReason::Interrupted);
    assert!(
        a.tokens.len() < 60 && !a.tokens.is_empty(),
        "{}",
        a.tokens.len()
    );
    assert_eq!(text(&out.got), a.text);
    // The next turn continues from the interrupted answer (plus its end token).
    let eot = 256;
    let before = chat.history().len();
    let b = chat.ask(&question(31), &mut Vec::new()).unwrap();
    assert_eq!(b.stop, StopReason::MaxNewTokens, "the flag was cleared");
    let h = chat.history();
    assert_eq!(h[before - 1], eot);
    assert_eq!(&h[before - 1 - a.tokens.len()..before - 1], &a.tokens[..]);
    let want = argmax_by_full_forward(&h[..h.len() - b.tokens.len() - 1], b.tokens.len());
    assert_eq!(b.tokens, want);
}

// ---- decoding ----

#[test]
fn tokens_mode_prints_the_argmax_of_full_forwards() {
    for seed in [11, 12, 13] {
        // Random lower-case bytes and spaces: text-like, so the greedy continuation varies
        // (after random bytes the tiny model tends to repeat one token, which checks little).
        let mut r = Rng::new(seed);
        let ids: Vec<u32> = (0..9)
            .map(|_| match r.below(27) {
                26 => 32,
                c => 97 + c as u32,
            })
            .collect();
        let arg: Vec<String> = ids.iter().map(u32::to_string).collect();
        let arg = arg.join(",");
        let (out, _) = succeeds(
            &[
                "--model",
                s(&tiny()),
                "--device",
                "reference",
                "--tokens",
                &arg,
                "--greedy",
                "--max-new-tokens",
                "12",
            ],
            None,
        );
        let got: Vec<u32> = out.trim().split(',').map(|t| t.parse().unwrap()).collect();
        assert_eq!(got, argmax_by_full_forward(&ids, 12), "prefix {arg}");
        let mut distinct = got.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() >= 3, "prefix {arg}: {got:?} checks little");
    }
}

#[test]
fn a_seed_repeats_its_draws_and_another_seed_does_not() {
    let run = |seed: &str| {
        succeeds(
            &[
                "--model",
                s(&tiny()),
                "--tokens",
                "72,111,114,115,101",
                "--temperature",
                "1.5",
                "--top-k",
                "0",
                "--top-p",
                "1",
                "--seed",
                seed,
                "--max-new-tokens",
                "40",
            ],
            None,
        )
        .0
    };
    let a = run("5");
    assert_eq!(a, run("5"));
    assert_ne!(a, run("6"));
    assert_eq!(a.trim().split(',').count(), 40);
}

#[test]
fn stop_strings_cut_the_answer_before_them() {
    let q = question(21);
    let full = session(greedy(40), &[]).ask(&q, &mut Vec::new()).unwrap();
    assert_eq!(full.stop, StopReason::MaxNewTokens);
    // A stop string taken from the middle of the greedy answer.
    let chars: Vec<(usize, char)> = full.text.char_indices().collect();
    let (from, to) = (chars[chars.len() / 2].0, chars[chars.len() / 2 + 3].0);
    let stop = &full.text[from..to];
    let cut = full.text.find(stop).unwrap();
    let mut shown = Vec::new();
    let a = session(greedy(40), &[stop, "never appears"])
        .ask(&q, &mut shown)
        .unwrap();
    assert_eq!(a.stop, StopReason::StopString);
    assert_eq!(a.text, full.text[..cut]);
    assert_eq!(
        text(&shown),
        a.text,
        "streamed text differs from the answer"
    );
    assert!(a.tokens.len() < full.tokens.len());
}

#[test]
fn streamed_pieces_join_to_the_answer_even_through_broken_utf8() {
    // A hot, unfiltered byte-level model draws arbitrary bytes: split and invalid UTF-8.
    // (Some seeds end at <|endoftext|> before drawing one; the padding ids 257..263 are
    // never drawn.)
    let mut non_ascii = 0;
    for seed in 0..4 {
        let s = Sampling {
            temperature: 3.0,
            max_new_tokens: 120,
            seed,
            ..Sampling::default()
        };
        let mut shown = Vec::new();
        let a = session(s, &[]).ask(&question(seed), &mut shown).unwrap();
        let tok = tokenizer::load(&tiny().join("tokenizer.json"), 264).unwrap();
        let full = tokenizer::decode(&tok, &a.tokens).unwrap();
        assert_eq!(text(&shown), full, "seed {seed}");
        assert_eq!(a.text, full, "seed {seed}");
        assert!(
            a.tokens.iter().all(|&t| t < 257),
            "seed {seed}: padding id drawn"
        );
        non_ascii += a.tokens.iter().filter(|t| (128..256).contains(*t)).count();
    }
    assert!(
        non_ascii > 0,
        "no non-ASCII byte drawn, the test shows nothing"
    );
}

// ---- the binary ----

#[test]
fn batch_mode_answers_every_line_keeps_fields_and_resumes() {
    let dir = scratch("batch");
    let input = dir.join("questions.jsonl");
    let output = dir.join("answers.jsonl");
    let qs: Vec<String> = (0..3).map(|i| question(40 + i)).collect();
    let mut lines = String::new();
    for (i, q) in qs.iter().enumerate() {
        let v = serde_json::json!({"question": q, "species": "dog", "id": i});
        lines.push_str(&format!("{v}\n"));
        if i == 0 {
            lines.push('\n'); // blank lines are skipped
        }
    }
    std::fs::write(&input, lines).unwrap();
    let args = |out: &Path| {
        vec![
            "--model".to_string(),
            s(&tiny()).into(),
            "--device".into(),
            "reference".into(),
            "--greedy".into(),
            "--max-new-tokens".into(),
            "12".into(),
            "--input".into(),
            s(&input).into(),
            "--output".into(),
            s(out).into(),
        ]
    };
    let argv = args(&output);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let (_, err) = succeeds(&argv, None);
    assert!(err.contains("3 answers written"), "{err}");
    let full = std::fs::read_to_string(&output).unwrap();
    let rows: Vec<serde_json::Value> = full
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["question"], qs[i].as_str());
        assert_eq!(r["species"], "dog");
        assert_eq!(r["id"], i);
        assert!(r["answer"].is_string());
        assert!(r["prompt_tokens"].as_u64().unwrap() > 10);
        assert!(r["new_tokens"].as_u64().unwrap() <= 12);
    }
    // Each question is answered on its own, as a one-shot --question would.
    let (one, _) = succeeds(
        &[
            "--model",
            s(&tiny()),
            "--device",
            "reference",
            "--greedy",
            "--max-new-tokens",
            "12",
            "--question",
            &qs[1],
        ],
        None,
    );
    assert_eq!(one.trim(), rows[1]["answer"].as_str().unwrap());
    // A crash after the first answer and half of the second: the rerun completes the file.
    let first_end = full.find('\n').unwrap() + 1;
    std::fs::write(&output, &full[..first_end + 20]).unwrap();
    let (_, err) = succeeds(&argv, None);
    assert!(err.contains("2 answers written"), "{err}");
    assert!(err.contains("1 were already there"), "{err}");
    assert_eq!(std::fs::read_to_string(&output).unwrap(), full);
    // An output that belongs to other questions is refused, not extended.
    let other = dir.join("other.jsonl");
    std::fs::write(
        &other,
        "{\"question\": \"something else\", \"answer\": \"x\"}\n",
    )
    .unwrap();
    let argv2 = args(&other);
    let argv2: Vec<&str> = argv2.iter().map(String::as_str).collect();
    let err = fails(&argv2);
    assert!(
        err.contains("other.jsonl:1") && err.contains("questions.jsonl:1"),
        "{err}"
    );
}

/// `--input` on the CPU decodes the questions together (batched steps over prompts of
/// different lengths); each answer is still the one a lone `--question` run gives.
#[test]
fn batch_mode_on_the_cpu_decodes_together_like_one_question_at_a_time() {
    let dir = scratch("batch-cpu");
    let input = dir.join("questions.jsonl");
    let output = dir.join("answers.jsonl");
    let qs: Vec<String> = (0..5).map(|i| question(70 + i)).collect();
    let lines: String = qs
        .iter()
        .map(|q| format!("{}\n", serde_json::json!({ "question": q })))
        .collect();
    std::fs::write(&input, lines).unwrap();
    let model = tiny();
    let common = [
        "--model",
        s(&model),
        "--device",
        "cpu",
        "--threads",
        "2",
        "--greedy",
        "--max-new-tokens",
        "16",
    ];
    let mut argv = common.to_vec();
    argv.extend(["--input", s(&input), "--output", s(&output)]);
    let (_, err) = succeeds(&argv, None);
    assert!(err.contains("5 answers written"), "{err}");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let lens: Vec<u64> = rows
        .iter()
        .map(|r| r["prompt_tokens"].as_u64().unwrap())
        .collect();
    assert!(
        lens.iter().any(|&l| l != lens[0]),
        "prompts of one length: {lens:?}"
    );
    for (q, r) in qs.iter().zip(&rows) {
        let mut one = common.to_vec();
        one.extend(["--question", q.as_str()]);
        let (alone, _) = succeeds(&one, None);
        assert_eq!(alone.trim(), r["answer"].as_str().unwrap(), "{q}");
    }
}

#[test]
fn batch_mode_reports_a_bad_line_as_file_and_line() {
    let dir = scratch("batch-bad");
    let output = dir.join("answers.jsonl");
    let cases = [
        (
            "{\"question\": \"ok?\"}\n{\"question\": 3}\n",
            ":2",
            "must be a string",
        ),
        (
            "{\"question\": \"ok?\"}\n\n{not json\n",
            ":3",
            "not valid JSON",
        ),
        ("{\"q\": \"ok?\"}\n", ":1", "missing \"question\""),
        ("{\"question\": \"  \"}\n", ":1", "empty"),
        (
            "{\"question\": \"a?\", \"answer\": \"b\"}\n",
            ":1",
            "--answer-field",
        ),
    ];
    for (i, (body, line, msg)) in cases.iter().enumerate() {
        let input = dir.join(format!("q{i}.jsonl"));
        std::fs::write(&input, body).unwrap();
        let err = fails(&[
            "--model",
            s(&tiny()),
            "--input",
            s(&input),
            "--output",
            s(&output),
        ]);
        let at = format!("q{i}.jsonl{line}");
        assert!(err.contains(&at) && err.contains(msg), "case {i}: {err}");
        assert!(!output.exists(), "case {i}: output written for bad input");
    }
}

#[test]
fn interactive_mode_carries_state_and_resets_through_piped_stdin() {
    let (q1, q2) = (question(60), question(61));
    let stdin = format!("{q1}\n\n{q2}\n/help\n/reset\n{q1}\n/nonsense\n/quit\n{q2}\n");
    let (out, err) = succeeds(
        &[
            "--model",
            s(&tiny()),
            "--device",
            "reference",
            "--greedy",
            "--max-new-tokens",
            "16",
            "--stop",
            "\n",
        ],
        Some(&stdin),
    );
    let mut chat = session(greedy(16), &["\n"]);
    let a1 = chat.ask(&q1, &mut Vec::new()).unwrap().text;
    let a2 = chat.ask(&q2, &mut Vec::new()).unwrap().text;
    let help_lines = trainer::chat::repl::HELP.lines().count();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3 + help_lines, "{out}");
    assert_eq!(lines[0], a1);
    assert_eq!(lines[1], a2);
    assert_eq!(
        lines[2 + help_lines],
        a1,
        "after /reset the first answer repeats"
    );
    assert_ne!(a1, a2);
    assert_eq!(err.matches("tok/s decode").count(), 3, "{err}");
    assert!(err.contains("conversation reset"), "{err}");
    assert!(err.contains("unknown command /nonsense"), "{err}");
    // End of input without /quit ends cleanly too.
    let (out, _) = succeeds(
        &["--model", s(&tiny()), "--greedy", "--max-new-tokens", "4"],
        Some("Why?"),
    );
    assert_eq!(out.lines().count(), 1);
}

#[test]
fn ctrl_c_stops_the_answer_and_at_the_prompt_leaves() {
    use std::io::{BufRead, BufReader, Read};
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_vet-chat"))
            .args(["--model", s(&tiny()), "--device", "reference", "--greedy"])
            .args(["--max-new-tokens", "100000000"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let sigint = |pid: u32| {
        let st = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    // While an answer is being written: it stops there, and the session goes on.
    let mut child = spawn();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"Why do cats purr?\n").unwrap();
    stdin.flush().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first).unwrap(); // the answer is streaming
    sigint(child.id());
    stdin.write_all(b"/quit\n").unwrap();
    drop(stdin);
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("stop: interrupted"), "{err}");
    // At the prompt: the program ends with 130, as a shell expects after Ctrl-C.
    let mut child = spawn();
    let mut banner = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut banner)
        .unwrap();
    assert!(banner.contains("vet-chat"), "{banner}");
    // stdin stays open until the child has gone, as a terminal's would: closing it is an
    // end of input, which ends the session with 0 if it wins the race with the signal's thread.
    let stdin = child.stdin.take().unwrap();
    sigint(child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("vet-chat ignored Ctrl-C at the prompt");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    drop(stdin);
    assert_eq!(status.code(), Some(130));
}

#[test]
fn bad_input_is_a_clear_error_never_a_panic() {
    // Missing files, each named.
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        let ck = tiny_copy(&format!("missing-{f}"));
        std::fs::remove_file(ck.join(f)).unwrap();
        let err = fails(&["--model", s(&ck), "--question", "Is it safe?"]);
        assert!(err.contains(s(&ck.join(f))), "{f}: {err}");
        assert!(err.contains("is missing"), "{f}: {err}");
        if f == "tokenizer.json" {
            // Token ids need no tokenizer.
            let (out, _) = succeeds(
                &[
                    "--model",
                    s(&ck),
                    "--tokens",
                    "1,2",
                    "--greedy",
                    "--max-new-tokens",
                    "3",
                ],
                None,
            );
            assert_eq!(out.trim().split(',').count(), 3);
        }
    }
    let err = fails(&[
        "--model",
        "/no/such/checkpoint",
        "--question",
        "Is it safe?",
    ]);
    assert!(err.contains("/no/such/checkpoint"), "{err}");
    // The 4096-token tokenizer does not fit the 264-row tiny model.
    let ck = tiny_copy("mismatch");
    std::fs::copy(fixtures::tokenizer(), ck.join("tokenizer.json")).unwrap();
    let err = fails(&["--model", s(&ck), "--question", "Is it safe?"]);
    assert!(
        err.contains("do not belong together") && err.contains("tokenizer.json"),
        "{err}"
    );
    // Empty questions and prompts, bad token ids, conflicting flags.
    let m = s(&tiny()).to_string();
    for (args, msg) in [
        (vec!["--question", "   "], "question is empty"),
        (vec!["--prompt", ""], "prompt is empty"),
        (vec!["--tokens", "1,x,3"], "\"x\" is not a token id"),
        (
            vec!["--tokens", "1,999"],
            "outside the model's vocabulary of 264",
        ),
        (vec!["--tokens", "1", "--stop", "a"], "--stop"),
        (vec!["--greedy", "--temperature", "0.5"], "--temperature"),
        (vec!["--top-p", "0"], "top-p"),
        (vec!["--dtype", "fp8"], "fp8"),
        (vec!["--question", "a", "--prompt", "b"], "--prompt"),
    ] {
        let mut argv = vec!["--model", m.as_str()];
        argv.extend(args.iter().copied());
        let err = fails(&argv);
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}
