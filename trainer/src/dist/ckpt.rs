//! Checkpoints of a ZeRO run: every rank writes its optimizer shard
//! (`zero/rank_R_of_W.safetensors`: `master`, `exp_avg`, `exp_avg_sq`, the parameters of its
//! chunk without padding) in parallel into a staging folder; rank 0 then writes the
//! consolidated `model.safetensors` (every rank holds the gathered weights) with the rest of
//! the checkpoint and moves the shards in, and the whole directory appears by one atomic
//! rename. Stage 0 holds the whole optimizer on every rank: rank 0 alone writes it as
//! `rank_0_of_1`.
//!
//! Loading re-shards: every rank reads every shard file of the old world size, lays them end
//! to end and cuts out its chunk of the new layout, so a run may resume at any world size.

use std::fs;
use std::path::{Path, PathBuf};

use reference::comm::Comm;
use reference::io::{read_tensors, write_tensors, TensorOut};

use super::shard::FlatLayout;
use super::zero::{owned, Shard, ZeroDriver};
use super::DistError;

/// The folder of the shards inside a checkpoint.
pub const ZERO_DIR: &str = "zero";

fn ck_err(path: &Path, msg: impl Into<String>) -> DistError {
    DistError::Checkpoint {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// The staging folder the ranks write their shards into before rank 0 moves it into the
/// checkpoint `dir`.
pub fn staging_dir(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map_or("ckpt".into(), |n| n.to_string_lossy());
    dir.with_file_name(format!(".{name}.zero.tmp"))
}

/// The shard file of `rank` of `world`.
pub fn shard_file(zero: &Path, rank: usize, world: usize) -> PathBuf {
    zero.join(format!("rank_{rank}_of_{world}.safetensors"))
}

/// Every rank: writes this rank's shard into the staging folder of `dir` (rank 0 makes it
/// first), and agrees with the others that every shard was written. Returns the staging
/// folder, which rank 0 then moves into the checkpoint with [`move_in`].
pub fn write_shards(
    dir: &Path,
    driver: &ZeroDriver,
    comm: &mut dyn Comm,
) -> Result<PathBuf, DistError> {
    let staging = staging_dir(dir);
    let mut failed = [0.0f64];
    if comm.rank() == 0 {
        let made = (|| {
            if staging.exists() {
                fs::remove_dir_all(&staging)?;
            }
            fs::create_dir_all(&staging)
        })();
        if made.is_err() {
            failed[0] = 1.0;
        }
    }
    comm.all_reduce_sum_f64(&mut failed)?;
    if failed[0] > 0.0 {
        return Err(ck_err(
            &staging,
            "rank 0 could not create the staging folder",
        ));
    }
    let stage0 = driver.cfg.stage == 0;
    let mut result = Ok(());
    if !stage0 || comm.rank() == 0 {
        let (rank, world) = if stage0 {
            (0, 1)
        } else {
            (comm.rank(), comm.world())
        };
        result = write_one(&shard_file(&staging, rank, world), driver);
    }
    let mut bad = [f64::from(u8::from(result.is_err()))];
    comm.all_reduce_sum_f64(&mut bad)?;
    result?;
    if bad[0] > 0.0 {
        return Err(ck_err(
            &staging,
            format!("{} rank(s) failed to write their optimizer shard", bad[0]),
        ));
    }
    Ok(staging)
}

fn write_one(path: &Path, driver: &ZeroDriver) -> Result<(), DistError> {
    let s = driver.shard();
    let n = s
        .range
        .len()
        .min(driver.layout.numel.saturating_sub(s.range.start));
    let t = |v: &[f32]| TensorOut::F32 {
        shape: vec![n],
        data: v[..n].to_vec(),
    };
    let tensors = vec![
        ("master".to_string(), t(&s.master)),
        ("exp_avg".to_string(), t(&s.m)),
        ("exp_avg_sq".to_string(), t(&s.v)),
    ];
    write_tensors(path, &tensors).map_err(|e| ck_err(path, e.to_string()))
}

/// Rank 0, inside the checkpoint's temporary folder `tmp`: moves the shards in.
pub fn move_in(staging: &Path, tmp: &Path) -> Result<(), DistError> {
    let to = tmp.join(ZERO_DIR);
    fs::rename(staging, &to).map_err(|e| {
        ck_err(
            staging,
            format!("moving the shards to {}: {e}", to.display()),
        )
    })
}

/// The world size the shards in `zero` were written at.
fn shard_world(zero: &Path) -> Result<usize, DistError> {
    let rd = fs::read_dir(zero).map_err(|e| ck_err(zero, e.to_string()))?;
    let mut worlds = Vec::new();
    for e in rd {
        let name = e.map_err(|e| ck_err(zero, e.to_string()))?.file_name();
        let name = name.to_string_lossy();
        if let Some(w) = name
            .strip_suffix(".safetensors")
            .and_then(|n| n.rsplit_once("_of_"))
            .and_then(|(_, w)| w.parse::<usize>().ok())
        {
            worlds.push(w);
        }
    }
    worlds.sort_unstable();
    worlds.dedup();
    match worlds.as_slice() {
        [w] => Ok(*w),
        [] => Err(ck_err(zero, "no optimizer shard (rank_R_of_W.safetensors)")),
        _ => Err(ck_err(
            zero,
            format!("shards of several world sizes: {worlds:?}"),
        )),
    }
}

/// The optimizer shard of `rank` at `stage` for the layout `layout`, re-sharded from the
/// shards in checkpoint `dir` (any world size); `step` is the AdamW step count.
pub fn load_shard(
    dir: &Path,
    layout: &FlatLayout,
    stage: u8,
    rank: usize,
    step: u64,
) -> Result<Shard, DistError> {
    let zero = dir.join(ZERO_DIR);
    let old_world = shard_world(&zero)?;
    let old = FlatLayout {
        world: old_world,
        chunk: layout.numel.div_ceil(old_world),
        ..layout.clone()
    };
    let mut full = [
        vec![0.0f32; layout.numel],
        vec![0.0; layout.numel],
        vec![0.0; layout.numel],
    ];
    for r in 0..old_world {
        let path = shard_file(&zero, r, old_world);
        let tensors = read_tensors(&path).map_err(|e| ck_err(&path, e.to_string()))?;
        let span = old.owned(r);
        for (i, key) in ["master", "exp_avg", "exp_avg_sq"].iter().enumerate() {
            let t = tensors
                .iter()
                .find(|(n, _)| n == key)
                .ok_or_else(|| ck_err(&path, format!("no tensor `{key}`")))?;
            if t.1.data.len() != span.len() {
                return Err(ck_err(
                    &path,
                    format!(
                        "`{key}` has {} values; rank {r} of {old_world} owns {} of this model's {} parameters",
                        t.1.data.len(),
                        span.len(),
                        layout.numel
                    ),
                ));
            }
            full[i][span.clone()].copy_from_slice(&t.1.data);
        }
    }
    let (range, _) = owned(layout, stage, rank);
    let cut = |v: &[f32]| {
        let mut out = vec![0.0f32; range.len()];
        let hi = range.end.min(layout.numel);
        if range.start < hi {
            out[..hi - range.start].copy_from_slice(&v[range.start..hi]);
        }
        out
    };
    Ok(Shard {
        master: cut(&full[0]),
        m: cut(&full[1]),
        v: cut(&full[2]),
        step,
        range,
    })
}
