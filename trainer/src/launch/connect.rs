//! From "which rank am I" to a working [`Comm`]: the one call the trainer makes.
//!
//! CPU ranks get a [`TcpComm`] on the rendezvous connections. GPU ranks use NCCL, which this
//! module does not know: the caller passes an [`NcclBootstrap`] that makes the unique id on
//! rank 0 and builds the communicator from it everywhere; the rendezvous carries the id.

use std::time::Duration;

use anyhow::{Context, Result};
use reference::comm::Comm;

use super::env::RankEnv;
use super::rendezvous::rendezvous;
use super::tcp::{TcpComm, TcpOptions};

/// Makes an NCCL communicator (implemented next to the NCCL comm, outside this module).
pub trait NcclBootstrap {
    /// Rank 0 only: a fresh unique id (`ncclGetUniqueId`, 128 bytes), handed to every rank.
    fn unique_id(&self) -> Result<Vec<u8>>;
    /// Every rank: the communicator for `env` (rank, world, `cuda:LOCAL_RANK`) from that id.
    fn build(&self, env: &RankEnv, unique_id: &[u8]) -> Result<Box<dyn Comm>>;
}

/// How the ranks talk once they have met.
pub enum Transport<'a> {
    /// CPU ranks: [`TcpComm`].
    Tcp,
    /// GPU ranks: NCCL, made by the caller.
    Nccl(&'a dyn NcclBootstrap),
}

/// Time limits of [`connect_with`].
#[derive(Clone, Copy, Debug)]
pub struct ConnectOptions {
    /// How long rank 0 waits for the others, and they for rank 0.
    pub rendezvous_timeout: Duration,
    pub tcp: TcpOptions,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            rendezvous_timeout: Duration::from_secs(300),
            tcp: TcpOptions::default(),
        }
    }
}

/// [`connect_with`] with the default time limits (5 minutes to meet; a rank silent for a
/// minute is taken as failed).
pub fn connect(env: &RankEnv, transport: Transport) -> Result<Box<dyn Comm>> {
    connect_with(env, transport, &ConnectOptions::default())
}

/// Meets the other ranks of `env` at `MASTER_ADDR:MASTER_PORT` and returns this rank's comm.
/// A world of one meets nobody.
pub fn connect_with(
    env: &RankEnv,
    transport: Transport,
    opts: &ConnectOptions,
) -> Result<Box<dyn Comm>> {
    let what = || {
        format!(
            "rank {} of {}: connecting through {}",
            env.rank,
            env.world,
            env.master()
        )
    };
    match transport {
        Transport::Tcp => {
            let r = rendezvous(env, &[], opts.rendezvous_timeout).with_context(what)?;
            Ok(Box::new(TcpComm::new(r, opts.tcp).with_context(what)?))
        }
        Transport::Nccl(nccl) => {
            let id = if env.rank == 0 {
                nccl.unique_id().context("making the NCCL unique id")?
            } else {
                Vec::new()
            };
            let r = rendezvous(env, &id, opts.rendezvous_timeout).with_context(what)?;
            nccl.build(env, &r.blob)
                .with_context(|| format!("rank {}: building the NCCL communicator", env.rank))
        }
    }
}
