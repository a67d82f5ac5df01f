//! A `vet-train` process started by a launcher (`vet-train launch`, torchrun, `srun`,
//! `mpirun`) joins its job here: which rank it is, which GPU it takes, how it meets the other
//! ranks (TCP for CPU ranks, NCCL for GPU ranks), and then the distributed training loop.

use anyhow::{Context, Result};
use reference::comm::Comm;

use super::config::ZeroConfig;
use crate::device::cuda_ordinal;
use crate::launch::{connect, Launcher, NcclBootstrap, RankEnv, Transport};
use crate::train::run::{RunOptions, RunSummary};
use crate::train::run_config::RunConfig;

/// NCCL communicators through `gpu::comm` (the rendezvous carries the unique id).
struct NcclBoot;

impl NcclBootstrap for NcclBoot {
    fn unique_id(&self) -> Result<Vec<u8>> {
        Ok(gpu::comm::unique_id()?.to_vec())
    }
    fn build(&self, env: &RankEnv, unique_id: &[u8]) -> Result<Box<dyn Comm>> {
        let id: &[u8; 128] = unique_id.try_into().with_context(|| {
            format!(
                "the NCCL unique id from rank 0 has {} bytes, expected 128",
                unique_id.len()
            )
        })?;
        let nccl = gpu::comm::Nccl::new(env.rank, env.world, id, env.local_rank)?;
        Ok(Box::new(nccl))
    }
}

/// The rank of this process when a launcher started it (`None`: a plain single process).
pub fn launched_rank() -> Result<Option<RankEnv>> {
    let env = RankEnv::from_env().context("reading the launcher's environment")?;
    Ok((env.launcher != Launcher::Single).then_some(env))
}

/// The device a rank uses: `cuda` becomes `cuda:LOCAL_RANK` (one GPU per rank); an explicit
/// `cuda:N` is refused on a node with several ranks, where every rank would take the same GPU.
pub fn rank_device(device: &str, env: &RankEnv) -> Result<String> {
    match cuda_ordinal(device)? {
        None => Ok(device.to_string()),
        Some(_) if device == "cuda" => Ok(format!("cuda:{}", env.local_rank)),
        Some(n) if env.world > 1 => anyhow::bail!(
            "--device cuda:{n} in a job of {} ranks: every rank would use GPU {n}; pass --device cuda \
             and each rank takes cuda:LOCAL_RANK",
            env.world
        ),
        Some(_) => Ok(device.to_string()),
    }
}

/// Runs `cfg` as rank `env` of a data-parallel job: meets the other ranks, then
/// [`super::train_distributed`] with the ZeRO settings `zero`.
pub fn train_as_rank(
    cfg: RunConfig,
    opts: &RunOptions,
    env: &RankEnv,
    zero: ZeroConfig,
) -> Result<RunSummary> {
    let mut opts = opts.clone();
    opts.device = rank_device(&opts.device, env)?;
    let transport = if cuda_ordinal(&opts.device)?.is_some() {
        Transport::Nccl(&NcclBoot)
    } else {
        Transport::Tcp
    };
    let comm = connect(env, transport)?;
    super::train_distributed(cfg, &opts, comm, zero)
}
