//! The training loop's distributed side: [`train_distributed`] runs `vet-train`'s loop
//! (`train::run`) with a [`ZeroDriver`] per rank. Rank `r` reads its slice of the token
//! shards (the loader slices by rank); rank 0 alone writes metrics, plots and model files;
//! every rank writes its optimizer shard into each checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use reference::comm::Comm;
use reference::engine::params_from_named;
use reference::{AdamWConfig, MambaConfig, Params, TrainingEngine};
use serde_json::json;

use super::ckpt::{load_shard, move_in, write_shards};
use super::config::ZeroConfig;
use super::zero::{Breakdown, CommRecord, MicroOut, ZeroDriver};
use crate::checkpoint::{save_dir_atomically, write_model_files};
use crate::lock::DirLock;
use crate::train::carry::Carry;
use crate::train::run::{RunOptions, RunSummary};
use crate::train::run_config::RunConfig;
use crate::train::source::Source;
use crate::train::state::{self, TrainerState};

/// Runs the training job `cfg` describes as one rank of a data-parallel job over `comm`,
/// with the ZeRO settings `zero`. Every rank calls it with the same config; `opts.device`
/// is this rank's device. The global batch is `micro batch × grad_accum × world`.
/// `vet-train train` without a world is [`crate::train::run::train`], unchanged.
pub fn train_distributed(
    cfg: RunConfig,
    opts: &RunOptions,
    comm: Box<dyn Comm>,
    mut zero: ZeroConfig,
) -> Result<RunSummary> {
    // fp16: the loss scale is applied to every rank's micro-batches and divided out of the
    // summed gradient by the driver (`ZeroDriver::set_loss_scale`); every rank's scaler sees
    // the same overflow, so all keep the same scale.
    zero.loss_scaled = cfg.optim.precision == crate::train::run_config::Precision::Fp16;
    if comm.rank() == 0 {
        for n in zero.no_effect(!cfg.train.carry_state.is_off()) {
            eprintln!("note: {n}");
        }
        eprintln!(
            "data parallel: {} ranks, ZeRO stage {}, global batch {} rows × {} micro-batches × {} ranks",
            comm.world(),
            zero.stage,
            cfg.train.batch,
            cfg.train.grad_accum,
            comm.world()
        );
    }
    crate::train::run::train_with(cfg, opts, Some((comm, zero)))
}

/// Rank 0 takes the output directory (its lock, and for a fresh run its claim) while the
/// other ranks wait; returns the lock (rank 0's), the rank and the world size.
pub(crate) fn claim_out_dir(
    out_dir: &Path,
    opts: &RunOptions,
    dist: &mut Option<crate::train::run::DistInit>,
) -> Result<(Option<DirLock>, usize, usize)> {
    let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.0.rank(), d.0.world()));
    let lock = (rank == 0).then(|| DirLock::acquire(out_dir)).transpose()?;
    if !opts.resume && rank == 0 {
        state::claim_for_fresh_run(out_dir, opts.overwrite)?;
    }
    if let Some((comm, _)) = dist.as_mut() {
        comm.barrier()
            .context("waiting for rank 0 to claim the output directory")?;
    }
    Ok((lock, rank, world))
}

/// A rank's communicator and driver, held by the training loop.
pub struct Dist {
    comm: Box<dyn Comm>,
    driver: ZeroDriver,
    last: Breakdown,
}

/// The `trainer_state.json` of checkpoint `dir` (a distributed checkpoint keeps its
/// optimizer in `zero/`, not in `optimizer.safetensors`).
pub fn load_trainer_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join("trainer_state.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Peak resident host memory of this process (Linux `VmHWM`), in bytes.
pub fn peak_host_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Dist {
    /// Makes the driver for `engine` (rank 0's weights broadcast to every rank) and, when
    /// resuming from `resume`, loads and re-shards its optimizer state.
    pub fn attach(
        engine: &mut dyn TrainingEngine,
        mut comm: Box<dyn Comm>,
        zero: ZeroConfig,
        resume: Option<&Path>,
    ) -> Result<Dist> {
        let stage = zero.stage;
        let offload = zero.offload_optimizer;
        let mut driver = ZeroDriver::new(engine, comm.as_mut(), zero)?;
        if comm.rank() == 0 {
            let on_engine = driver.in_engine() || driver.on_device();
            let whole = if stage == 0 {
                "whole on every rank"
            } else {
                "each rank its chunk"
            };
            let place = if on_engine {
                format!("in the engine ({}), {whole}", engine.name())
            } else {
                format!("in host memory (the driver's AdamW on the CPU), {whole}")
            };
            eprintln!("optimizer state: {place}");
            if !on_engine && offload == super::config::OffloadDevice::None {
                eprintln!("note: zero_optimization.offload_optimizer: none — this engine or stage keeps the optimizer in host memory whatever this says (on a GPU, stages 0–2 keep it on the device)");
            }
        }
        if let Some(dir) = resume {
            let st = load_trainer_state(dir)?;
            let rank = comm.rank();
            let shard = load_shard(dir, &driver.layout, stage, rank, st.adam_step)?;
            driver.set_shard(shard)?;
            driver.sync_engine(engine, comm.as_mut())?;
        }
        Ok(Dist {
            comm,
            driver,
            last: Breakdown::default(),
        })
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// One step over `accum` micro-batches of this rank: (mean loss or `None` when skipped,
    /// gradient norm, tokens over every rank). With `carry` (stateful training) each
    /// micro-batch is `k` consecutive windows of this rank's rows, their states carried.
    pub fn step(
        &mut self,
        engine: &mut dyn TrainingEngine,
        source: &mut Source,
        carry: Option<&mut Carry>,
        accum: usize,
        (hp, lr, loss_scale): (&AdamWConfig, f64, f64),
    ) -> Result<(Option<f64>, f64, usize)> {
        self.driver.set_loss_scale(loss_scale)?;
        let k = carry.as_ref().map_or(1, |c| c.k());
        let micro = (0..accum * k)
            .map(|_| source.next_batch())
            .collect::<Result<Vec<_>>>()?;
        let comm = self.comm.as_mut();
        let out = match carry {
            None => self.driver.step(engine, comm, &micro, hp, lr)?,
            Some(c) => self
                .driver
                .step_with(engine, comm, accum, hp, lr, |engine, scale| {
                    let mut out = MicroOut::default();
                    for windows in micro.chunks(k) {
                        let o = c.windows(engine, windows, scale)?;
                        out.add(o.loss, o.tokens);
                    }
                    Ok(out)
                })?,
        };
        self.last = out.breakdown;
        Ok((out.loss, out.grad_norm, out.tokens as usize))
    }

    /// Every parameter into the engine (stage 3 keeps them sharded between steps).
    pub fn sync(&mut self, engine: &mut dyn TrainingEngine) -> Result<()> {
        self.driver.sync_engine(engine, self.comm.as_mut())?;
        Ok(())
    }

    /// Whether `mine` holds on any rank (a stop asked for on one rank stops them all).
    pub fn any_rank(&mut self, mine: bool) -> Result<bool> {
        let mut v = [f64::from(u8::from(mine))];
        self.comm.all_reduce_sum_f64(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// `wall_clock_breakdown`, `comms_logger` and (after the first step) the memory report
    /// into the metrics (rank 0's; other ranks pass a sink).
    pub fn log_step(&mut self, step: u64, first: bool, metrics: &mut dyn Write) -> Result<()> {
        let comms = self.driver.take_comms();
        let z = &self.driver.cfg;
        if z.wall_clock_breakdown {
            let b = &self.last;
            let line = json!({"step": step, "forward_backward_s": b.forward_backward, "optimizer_step_s": b.step, "communication_s": b.comm, "communication_overlapped_s": b.comm_overlapped});
            writeln!(metrics, "{line}")?;
        }
        if z.comms_logger {
            for c in summarize(&comms) {
                let gbps = c.bytes as f64 / c.secs.max(1e-12) / 1e9;
                let line = json!({"step": step, "collective": c.op, "bytes": c.bytes, "secs": c.secs, "gb_per_s": gbps});
                writeln!(metrics, "{line}")?;
            }
        }
        if first {
            let rss = peak_host_rss();
            let mut all = vec![0.0f64; self.comm.world()];
            all[self.comm.rank()] = rss.unwrap_or(0) as f64;
            self.comm.all_reduce_sum_f64(&mut all)?;
            eprintln!(
                "rank {}: peak host memory {:.2} GiB after the first step",
                self.comm.rank(),
                rss.unwrap_or(0) as f64 / (1u64 << 30) as f64
            );
            let line = json!({"step": step, "peak_host_rss_bytes_per_rank": all});
            writeln!(metrics, "{line}")?;
        }
        Ok(())
    }

    /// The checkpoint of step `st.step` in `dir`: every rank's optimizer shard (and carried
    /// states: `carry`, with the micro batch's row count), and from rank 0 the consolidated
    /// model files and trainer state, all appearing by one rename.
    #[allow(clippy::too_many_arguments)]
    pub fn save(
        &mut self,
        dir: &Path,
        mcfg: &MambaConfig,
        engine: &mut dyn TrainingEngine,
        tokenizer: Option<&Path>,
        st: &TrainerState,
        keep_last: usize,
        carry: Option<(&Carry, usize)>,
    ) -> Result<PathBuf> {
        self.sync(engine)?;
        self.driver.refresh_shard(engine)?;
        let staging = write_shards(dir, &self.driver, self.comm.as_mut())?;
        if let Some((c, batch)) = carry {
            let r = c.save(&staging, mcfg, batch);
            if let Err(e) = &r {
                eprintln!("rank {}: carried states not written: {e:#}", self.rank());
            }
            let mut bad = [f64::from(u8::from(r.is_err()))];
            self.comm.all_reduce_sum_f64(&mut bad)?;
            r?;
            anyhow::ensure!(
                bad[0] == 0.0,
                "{} rank(s) could not write their carried states into {}",
                bad[0],
                staging.display()
            );
        }
        let mut failed = [0.0f64];
        if self.comm.rank() == 0 {
            let r = self.save_rank0(dir, &staging, mcfg, engine, tokenizer, st, keep_last);
            if let Err(e) = &r {
                eprintln!("rank 0: checkpoint {} failed: {e:#}", dir.display());
                failed[0] = 1.0;
            }
        }
        self.comm.all_reduce_sum_f64(&mut failed)?;
        anyhow::ensure!(
            failed[0] == 0.0,
            "rank 0 could not write checkpoint {}",
            dir.display()
        );
        Ok(dir.to_path_buf())
    }

    #[allow(clippy::too_many_arguments)]
    fn save_rank0(
        &self,
        dir: &Path,
        staging: &Path,
        mcfg: &MambaConfig,
        engine: &dyn TrainingEngine,
        tokenizer: Option<&Path>,
        st: &TrainerState,
        keep_last: usize,
    ) -> Result<()> {
        let params: Params<f32> = params_from_named(mcfg, &engine.parameters()?)?;
        save_dir_atomically(dir, |tmp| {
            write_model_files(tmp, mcfg, &params, tokenizer)?;
            let state = TrainerState {
                adam_step: self.driver.shard().step,
                ..st.clone()
            };
            let json = serde_json::to_string_pretty(&state)?;
            reference::fs::atomic_write(&tmp.join("trainer_state.json"), json.as_bytes())?;
            move_in(staging, tmp)?;
            Ok(())
        })?;
        let out_dir = dir
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."));
        let all = state::list(out_dir)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep_last.max(1))) {
            std::fs::remove_dir_all(old)
                .with_context(|| format!("removing old checkpoint {}", old.display()))?;
        }
        Ok(())
    }
}

/// Collectives of one step summed per kind.
fn summarize(comms: &[CommRecord]) -> Vec<CommRecord> {
    let mut out: Vec<CommRecord> = Vec::new();
    for c in comms {
        match out.iter_mut().find(|o| o.op == c.op) {
            Some(o) => {
                o.bytes += c.bytes;
                o.secs += c.secs;
            }
            None => out.push(c.clone()),
        }
    }
    out
}
