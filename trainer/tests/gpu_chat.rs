//! `vet-chat`'s session on the CUDA tier (f32) against the reference, on the bundled tiny
//! checkpoint: the same greedy answers over three turns (the state carried between turns on
//! the device), the decode state held in device memory, and that state read back close to
//! the reference's. Without a CUDA device the test prints a `skipping` line and passes; on
//! the device: `bash scripts/gpu-tests.sh run`.

use trainer::chat::{ChatConfig, Session};
use trainer::checkpoint;
use trainer::data::qa::QaTemplate;
use trainer::device::{engine_with, EngineOptions};
use trainer::generate::Sampling;
use trainer::tokenizer;

fn session(device: &str) -> Session {
    let dir = fixtures::tiny_checkpoint();
    let ck = checkpoint::load(&dir).unwrap();
    let tok = tokenizer::load(&dir.join("tokenizer.json"), ck.config.vocab_size).unwrap();
    let opts = EngineOptions {
        precision: gpu::Precision::F32,
        ..EngineOptions::default()
    };
    let engine = engine_with(device, &ck.config, ck.params, &opts).unwrap();
    let sampling = Sampling {
        temperature: 0.0,
        repetition_penalty: 1.0,
        max_new_tokens: 40,
        ..Sampling::default()
    };
    let cfg = ChatConfig {
        sampling,
        stop_strings: Vec::new(),
        template: QaTemplate::default(),
    };
    Session::new(engine, tok, cfg).unwrap()
}

#[test]
fn gpu_chat_answers_like_the_reference() {
    if let Err(e) = gpu::available() {
        println!("skipping gpu_chat_answers_like_the_reference: {e}");
        return;
    }
    let mut g = session("cuda");
    let mut r = session("reference");
    assert_eq!(g.engine_name(), "cuda:0");
    for q in [
        "How often should a dog be vaccinated against rabies?",
        "And a cat?",
        "What dose of meloxicam suits a 4 kg cat?",
    ] {
        let a = g.ask(q, &mut Vec::new()).unwrap();
        let b = r.ask(q, &mut Vec::new()).unwrap();
        assert_eq!(a.tokens, b.tokens, "answers to {q:?} differ");
        assert!(!a.tokens.is_empty());
    }
    let sg = g.state().unwrap().clone();
    let sr = r.state().unwrap().clone();
    let worst = sg
        .ssm
        .data
        .iter()
        .chain(&sg.conv.data)
        .zip(sr.ssm.data.iter().chain(&sr.conv.data))
        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "state after three turns differs by {worst}");
    assert!(
        sg.ssm.data.iter().any(|&v| v != 0.0),
        "the state never moved"
    );
}
