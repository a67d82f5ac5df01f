//! Several processes, one job: which rank this process is ([`env`](mod@env)), how the ranks find each
//! other ([`rendezvous`](mod@rendezvous)), a TCP implementation of [`reference::comm::Comm`] for CPU ranks
//! ([`tcp`]), and `vet-train launch`, which starts the ranks of one node ([`launcher`]).

pub mod connect;
pub mod env;
mod gpus;
pub mod launcher;
mod nodelist;
pub mod selftest;

pub use env::{EnvError, Launcher, RankEnv};
pub mod rendezvous;
pub mod tcp;
mod wire;

pub use connect::{connect, connect_with, ConnectOptions, NcclBootstrap, Transport};
pub use gpus::{count_from, count_gpus};
pub use rendezvous::{rendezvous, Rendezvous, RendezvousError};
pub use tcp::{TcpComm, TcpOptions};
