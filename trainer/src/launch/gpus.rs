//! How many GPUs this process may use, without loading CUDA: `CUDA_VISIBLE_DEVICES` when
//! set (its entries up to the first invalid one, as CUDA reads it), else the entries of
//! `/proc/driver/nvidia/gpus` (one per GPU the NVIDIA driver sees).

use std::path::Path;

use anyhow::{bail, Result};

/// The visible GPU count (see the module comment).
pub fn count_gpus() -> Result<usize> {
    count_from(
        std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
        Path::new("/proc/driver/nvidia/gpus"),
    )
}

/// [`count_gpus`] from a given `CUDA_VISIBLE_DEVICES` value and driver folder.
pub fn count_from(visible: Option<&str>, driver: &Path) -> Result<usize> {
    if let Some(v) = visible {
        // CUDA stops at the first entry that is not a device index or UUID.
        let valid = |e: &&str| {
            let e = e.trim();
            e.parse::<u32>().is_ok() || e.starts_with("GPU-") || e.starts_with("MIG-")
        };
        return Ok(v.split(',').take_while(valid).count());
    }
    match std::fs::read_dir(driver) {
        Ok(entries) => Ok(entries.filter_map(|e| e.ok()).count()),
        Err(_) => bail!(
            "cannot count the GPUs: CUDA_VISIBLE_DEVICES is not set and {} cannot be read \
             (no NVIDIA driver?); pass --nproc-per-node",
            driver.display()
        ),
    }
}
