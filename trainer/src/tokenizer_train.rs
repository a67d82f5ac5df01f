//! `vet-data tokenizer` (being written).

use anyhow::{bail, Result};

/// Arguments of `vet-data tokenizer`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    bail!("vet-data tokenizer is not written yet")
}
