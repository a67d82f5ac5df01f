//! `vet-data prepare` (being written).

use anyhow::{bail, Result};

/// Arguments of `vet-data prepare`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    bail!("vet-data prepare is not written yet")
}
