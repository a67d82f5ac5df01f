//! Asks a Vet-Mamba checkpoint a question through the app API (`trainer::assistant`),
//! printing the answer as it is written.
//!
//! ```text
//! cargo run -p trainer --example ask                                  # fixtures/tiny
//! cargo run -p trainer --example ask -- runs/vet-model "Why is my cat sneezing?"
//! ```
//! The bundled `fixtures/tiny` model is untrained: its answer is noise, but it runs the whole
//! path (load, template, prefill, decode, stream) that a real checkpoint does.

use std::ops::ControlFlow;
use std::path::Path;

use trainer::assistant::{Answer, Assistant, AssistantError, AssistantOptions};
use trainer::generate::Sampling;

/// Loads `dir` on the CPU and answers `question` greedily (at most `max_new_tokens`), handing
/// each piece of the answer to `print` as it comes.
pub fn answer(
    dir: &Path,
    question: &str,
    max_new_tokens: usize,
    mut print: impl FnMut(&str),
) -> Result<Answer, AssistantError> {
    let opts = AssistantOptions {
        sampling: Sampling {
            max_new_tokens,
            ..Sampling::default()
        },
        ..AssistantOptions::default()
    };
    let mut vet = Assistant::load(dir, opts)?;
    vet.ask(question, |piece| {
        print(piece);
        ControlFlow::Continue(())
    })
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .map_or_else(fixtures::tiny_checkpoint, Into::into);
    let question = args
        .next()
        .unwrap_or_else(|| "What should I feed a rabbit?".into());
    println!("Q: {question}");
    print!("A: ");
    let a = answer(&dir, &question, 48, |piece| print!("{piece}"))?;
    println!("\n[{} tokens, stop: {}]", a.tokens.len(), a.stop.name());
    Ok(())
}
