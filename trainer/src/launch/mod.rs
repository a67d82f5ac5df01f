//! Several processes, one job: which rank this process is ([`env`]), how the ranks find each
//! other ([`rendezvous`]), a TCP implementation of [`reference::comm::Comm`] for CPU ranks
//! ([`tcp`]), and `vet-train launch`, which starts the ranks of one node ([`launcher`]).

pub mod env;
mod nodelist;

pub use env::{EnvError, Launcher, RankEnv};
