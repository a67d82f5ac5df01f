//! `vet-data inspect` (being written).

use anyhow::{bail, Result};

/// Arguments of `vet-data inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    bail!("vet-data inspect is not written yet")
}
