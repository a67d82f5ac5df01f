//! `vet-data`: tokenizers and corpus preparation for Vet-Mamba.

use anyhow::Result;
use clap::{Parser, Subcommand};
use trainer::data::{inspect, prepare};
use trainer::tokenizer_train;

#[derive(Parser)]
#[command(
    name = "vet-data",
    version,
    about = "Train tokenizers and turn veterinary text corpora into token shards"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a byte-level BPE tokenizer on a corpus and save tokenizer.json.
    #[command(allow_negative_numbers = true)]
    Tokenizer(tokenizer_train::Args),
    /// Tokenize .txt / .jsonl corpora (plain, .gz or .zst) into train/val token shards + manifest.
    #[command(allow_negative_numbers = true)]
    Prepare(prepare::Args),
    /// Print a shard's header, counts and a decoded sample, and verify its checksums.
    #[command(allow_negative_numbers = true)]
    Inspect(inspect::Args),
}

fn main() -> std::process::ExitCode {
    // `error: …` on one line, the same with or without RUST_BACKTRACE.
    trainer::cli::finish(run(Cli::parse()))
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Tokenizer(a) => tokenizer_train::run(a),
        Cmd::Prepare(a) => prepare::run(a),
        Cmd::Inspect(a) => inspect::run(a),
    }
}
