//! `vet-train`: Vet-Mamba's command-line tool.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use trainer::{checkpoint, debug_state, device, generate, tokenizer};

#[derive(Parser)]
#[command(
    name = "vet-train",
    version,
    about = "Train, run and debug Vet-Mamba (Mamba-1) language models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Dump logits, loss and every gradient for given tokens, to compare with other implementations.
    DebugState {
        /// Checkpoint directory (config.json + model.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// safetensors file holding `input_ids` (i64, [batch, seq_len]).
        #[arg(long)]
        tokens: PathBuf,
        /// Where to write logits, loss and grad.<name> (safetensors).
        #[arg(long)]
        out: PathBuf,
        /// reference (f32), reference-f64, cpu or cuda[:N].
        #[arg(long, default_value = "reference")]
        device: String,
    },
    /// Continue a prompt with a checkpoint (greedy unless --temperature is set).
    Generate {
        /// Checkpoint directory (config.json + model.safetensors + tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// The text to continue.
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        max_new_tokens: usize,
        /// 0 = greedy (deterministic).
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "reference")]
        device: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::DebugState {
            model,
            tokens,
            out,
            device,
        } => {
            let ck = checkpoint::load(&model)?;
            let mut engine = device::engine(&device, &ck.config, ck.params)?;
            let s = debug_state::run(engine.as_mut(), &tokens, &out)?;
            println!(
                "debug-state: {} on [{}, {}] tokens: loss {:.6}; wrote {} tensors to {}",
                engine.name(),
                s.batch,
                s.seq_len,
                s.loss,
                s.tensors,
                out.display()
            );
        }
        Cmd::Generate {
            model,
            prompt,
            max_new_tokens,
            temperature,
            seed,
            device,
        } => {
            let ck = checkpoint::load(&model)?;
            let tok = tokenizer::load(&model.join("tokenizer.json"), ck.config.vocab_size)?;
            let ids = tokenizer::encode(&tok, &prompt)?;
            let stop = tok.token_to_id(tokenizer::EOT);
            let mut engine = device::engine(&device, &ck.config, ck.params)?;
            let s = generate::Sampling {
                temperature,
                max_new_tokens,
                seed,
                stop_token: stop,
            };
            print!("{prompt}");
            let mut out = std::io::stdout();
            let mut pending: Vec<u32> = Vec::new();
            let started = std::time::Instant::now();
            let new = generate::generate(engine.as_mut(), &ids, &s, |t| {
                // Byte-level tokens may split a UTF-8 character: print once it decodes whole.
                pending.push(t);
                if let Ok(text) = tokenizer::decode(&tok, &pending) {
                    if !text.contains('\u{FFFD}') {
                        print!("{text}");
                        let _ = out.flush();
                        pending.clear();
                    }
                }
            })
            .context("generating")?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "\n[{} prompt + {} new tokens in {secs:.2} s, {:.1} tokens/s, {}]",
                ids.len(),
                new.len(),
                new.len() as f64 / secs,
                engine.name()
            );
        }
    }
    Ok(())
}
