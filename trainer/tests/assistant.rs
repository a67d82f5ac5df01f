//! The app API on `fixtures/tiny`: the example runs, greedy answers are `generate`'s tokens,
//! a callback or a handle cancels, a second question continues the conversation, arrays come
//! out with the engine's values, and bad input is a typed error.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use approx::assert_relative_eq;
use reference::InferenceEngine;
use trainer::assistant::{forward_array, Assistant, AssistantError, AssistantOptions, StopReason};
use trainer::data::qa::QaTemplate;
use trainer::generate::{generate, Sampling};
use trainer::tokenizer::{encode, EOT};

#[allow(dead_code)]
#[path = "../examples/ask.rs"]
mod ask_example;

const Q1: &str = "What should I feed a rabbit?";
const Q2: &str = "How often should a puppy be vaccinated?";

fn opts(max_new_tokens: usize) -> AssistantOptions {
    AssistantOptions {
        threads: 1,
        sampling: Sampling {
            max_new_tokens,
            ..Sampling::default()
        },
        ..AssistantOptions::default()
    }
}

fn tiny() -> PathBuf {
    fixtures::tiny_checkpoint()
}

#[test]
fn the_example_answers_a_question_on_tiny() {
    let mut streamed = String::new();
    let a = ask_example::answer(&tiny(), Q1, 12, |p| streamed.push_str(p)).unwrap();
    assert!(!a.tokens.is_empty() && a.tokens.len() <= 12);
    assert_eq!(streamed, a.text);
    assert!(a.prompt_tokens > Q1.len() / 4);
}

#[test]
fn a_greedy_answer_is_generates_tokens() {
    let mut vet = Assistant::load(&tiny(), opts(20)).unwrap();
    let got = vet.ask(Q2, |_| ControlFlow::Continue(())).unwrap();

    let ck = trainer::checkpoint::load(&tiny()).unwrap();
    let tok =
        trainer::tokenizer::load(&tiny().join("tokenizer.json"), ck.config.vocab_size).unwrap();
    let mut engine = trainer::device::engine("cpu", &ck.config, ck.params).unwrap();
    let prompt = encode(&tok, &QaTemplate::default().render(Q2)).unwrap();
    let s = Sampling {
        max_new_tokens: 20,
        stop_token: tok.token_to_id(EOT),
        ..Sampling::default()
    };
    let want = generate(engine.as_mut(), &prompt, &s, |_| {}).unwrap();
    assert_eq!(got.tokens, want);
    assert_eq!(got.prompt_tokens, prompt.len());
}

#[test]
fn breaking_from_the_callback_stops_after_that_piece() {
    let mut vet = Assistant::load(&tiny(), opts(40)).unwrap();
    let full = vet.ask(Q1, |_| ControlFlow::Continue(())).unwrap();
    assert!(full.tokens.len() > 5, "{:?}", full.tokens);
    vet.reset().unwrap();
    let mut pieces = 0;
    let cut = vet
        .ask(Q1, |_| {
            pieces += 1;
            if pieces == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(pieces, 3);
    assert_eq!(cut.stop, StopReason::Interrupted);
    assert!(cut.tokens.len() < full.tokens.len());
    assert_eq!(cut.tokens[..], full.tokens[..cut.tokens.len()]);
    // The conversation goes on after a cancelled answer.
    assert_eq!(vet.turns(), 1);
}

#[test]
fn a_cancel_handle_stops_the_answer_in_progress() {
    let mut vet = Assistant::load(&tiny(), opts(40)).unwrap();
    let handle = vet.cancel_handle();
    let mut pieces = 0;
    let a = vet
        .ask(Q1, |_| {
            pieces += 1;
            if pieces == 2 {
                handle.cancel();
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!((pieces, a.stop), (2, StopReason::Interrupted));
}

#[test]
fn a_second_question_continues_from_the_first() {
    let mut vet = Assistant::load(&tiny(), opts(16)).unwrap();
    vet.ask(Q1, |_| ControlFlow::Continue(())).unwrap();
    let follow_up = vet.ask(Q2, |_| ControlFlow::Continue(())).unwrap();
    let after_both = vet.state().unwrap().clone();
    assert_eq!(vet.turns(), 2);
    vet.reset().unwrap();
    assert_eq!(vet.turns(), 0);
    assert!(vet.state().unwrap().ssm.data.iter().all(|&v| v == 0.0));
    let fresh = vet.ask(Q2, |_| ControlFlow::Continue(())).unwrap();
    let after_one = vet.state().unwrap().clone();
    // The follow-up prefilled only its own question (and the last answer's end), yet its
    // state carries the first turn: it differs from asking the same question afresh.
    assert!(follow_up.prompt_tokens <= fresh.prompt_tokens + 2);
    let moved = after_both
        .ssm
        .data
        .iter()
        .zip(&after_one.ssm.data)
        .filter(|(a, b)| (*a - *b).abs() > 1e-4)
        .count();
    assert!(
        moved > after_one.ssm.data.len() / 10,
        "{moved} values moved"
    );
}

#[test]
fn logits_come_out_as_arrays_with_the_engines_values() {
    let mut vet = Assistant::load(&tiny(), opts(4)).unwrap();
    let vocab = vet.config().vocab_size;
    let text = "Dogs need water.";
    let last = vet.logits(text).unwrap();
    let all = vet.forward(text).unwrap();
    assert_eq!(last.len(), vocab);
    let n = all.shape()[1];
    assert_eq!(all.shape(), &[1, n, vocab]);
    for v in 0..vocab {
        assert_relative_eq!(
            last[v],
            all[[0, n - 1, v]],
            max_relative = 1e-5,
            epsilon = 1e-6
        );
    }
    let ck = trainer::checkpoint::load(&tiny()).unwrap();
    let mut e = reference::ReferenceEngine::new(ck.config.clone(), ck.params);
    let ids: Vec<u32> = (0..6).map(|i| (i * 37 + 5) % vocab as u32).collect();
    let arr = forward_array(&mut e, &ids, 2, 3).unwrap();
    let (flat, _) = e
        .forward(&reference::model::Batch::new(&ids, 2, 3), None)
        .unwrap();
    assert_eq!(arr.shape(), &[2, 3, vocab]);
    assert_eq!(arr.as_slice().unwrap(), &flat.data[..]);
}

fn copy_of_tiny(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vet-assistant-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(tiny().join(f), dir.join(f)).unwrap();
    }
    dir
}

#[test]
fn bad_models_devices_and_questions_are_typed_errors() {
    let missing = Path::new("/nonexistent/vet-model");
    let e = Assistant::load(missing, opts(4)).err().unwrap();
    assert!(matches!(e, AssistantError::ModelNotFound { .. }), "{e}");

    let dir = copy_of_tiny("badcfg");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let e = Assistant::load(&dir, opts(4)).err().unwrap();
    assert!(matches!(e, AssistantError::BadCheckpoint { .. }), "{e}");

    let dir = copy_of_tiny("badtok");
    std::fs::write(dir.join("tokenizer.json"), "[]").unwrap();
    let e = Assistant::load(&dir, opts(4)).err().unwrap();
    assert!(matches!(e, AssistantError::Tokenizer { .. }), "{e}");

    let o = AssistantOptions {
        device: "tpu".into(),
        ..opts(4)
    };
    let e = Assistant::load(&tiny(), o).err().unwrap();
    assert!(matches!(e, AssistantError::Device { .. }), "{e}");
    assert!(e.to_string().contains("tpu"), "{e}");

    let mut vet = Assistant::load(&tiny(), opts(4)).unwrap();
    let e = vet.ask("  ", |_| ControlFlow::Continue(())).unwrap_err();
    assert!(matches!(e, AssistantError::BadInput(_)), "{e}");
}
