//! Which rank this process is: read from the environment of the launcher that started it.
//!
//! Three conventions are understood, checked in this order (the first one present wins, so
//! `srun torchrun …` and `vet-train launch` under SLURM use torchrun's per-process values):
//! - torchrun / `vet-train launch`: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//!   `MASTER_PORT`;
//! - Open MPI `mpirun`: `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`,
//!   `OMPI_COMM_WORLD_LOCAL_RANK`, with `MASTER_ADDR` (Open MPI has no such notion: pass it with
//!   `mpirun -x MASTER_ADDR=host`) and `MASTER_PORT` (default [`DEFAULT_PORT`]);
//! - SLURM `srun`: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, and the first host of
//!   `SLURM_JOB_NODELIST` (or `MASTER_ADDR` when set); the port is `MASTER_PORT`, else one
//!   derived from `SLURM_JOB_ID` so two jobs sharing a node do not collide.
//!
//! None present = a single process. A malformed or contradictory value is an error that names
//! the variable; nothing is silently defaulted. Everything is parsed from a map
//! ([`RankEnv::from_map`]) so tests never touch the real environment.

use std::collections::HashMap;

use super::nodelist::first_host;

/// The port rank 0 listens on when the launcher names none (torchrun's default).
pub const DEFAULT_PORT: u16 = 29500;

/// Which launcher's variables gave the rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher variables: one process.
    Single,
    Torchrun,
    OpenMpi,
    Slurm,
}

impl Launcher {
    pub fn name(self) -> &'static str {
        match self {
            Launcher::Single => "single process",
            Launcher::Torchrun => "torchrun",
            Launcher::OpenMpi => "Open MPI",
            Launcher::Slurm => "SLURM",
        }
    }
}

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world: usize,
    /// Rank on this node: picks the GPU (`cuda:LOCAL_RANK`).
    pub local_rank: usize,
    /// Where rank 0 listens for the rendezvous.
    pub master_addr: String,
    pub master_port: u16,
    pub launcher: Launcher,
}

/// A launcher variable that is missing, malformed or contradicts another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value:?}: {msg}")]
pub struct EnvError {
    pub var: String,
    pub value: String,
    pub msg: String,
}

fn err(var: &str, value: &str, msg: impl Into<String>) -> EnvError {
    EnvError {
        var: var.into(),
        value: value.into(),
        msg: msg.into(),
    }
}

type Vars<'a> = &'a HashMap<String, String>;

impl RankEnv {
    /// One process, no rendezvous.
    pub fn single() -> RankEnv {
        RankEnv {
            rank: 0,
            world: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_PORT,
            launcher: Launcher::Single,
        }
    }

    /// Reads the real process environment.
    pub fn from_env() -> Result<RankEnv, EnvError> {
        RankEnv::from_map(&std::env::vars().collect())
    }

    /// Reads the launcher variables from `vars` (see the module comment).
    pub fn from_map(vars: &HashMap<String, String>) -> Result<RankEnv, EnvError> {
        let has = |names: &[&str]| names.iter().any(|n| vars.contains_key(*n));
        if has(&["RANK", "WORLD_SIZE", "LOCAL_RANK"]) {
            return torchrun(vars);
        }
        if has(&["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"]) {
            return open_mpi(vars);
        }
        if has(&["SLURM_PROCID"]) {
            return slurm(vars);
        }
        Ok(RankEnv::single())
    }

    /// Whether other ranks exist.
    pub fn is_distributed(&self) -> bool {
        self.world > 1
    }

    /// `MASTER_ADDR:MASTER_PORT` as one string (IPv6 literals bracketed).
    pub fn master(&self) -> String {
        if self.master_addr.contains(':') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }
}

/// A required variable's text.
fn get<'a>(vars: Vars<'a>, var: &str, why: &str) -> Result<&'a str, EnvError> {
    vars.get(var)
        .map(|s| s.trim())
        .ok_or_else(|| err(var, "", format!("not set ({why})")))
}

/// A non-negative integer variable.
fn number(vars: Vars, var: &str, why: &str) -> Result<usize, EnvError> {
    let v = get(vars, var, why)?;
    v.parse()
        .map_err(|_| err(var, v, "expected a non-negative integer"))
}

/// World size, rank and local rank, checked against each other.
fn triple(vars: Vars, names: [&str; 3], launcher: &str) -> Result<(usize, usize, usize), EnvError> {
    let why = format!("{launcher} sets it with {} and {}", names[0], names[1]);
    let [rank_var, world_var, local_var] = names;
    let world = number(vars, world_var, &why)?;
    if world == 0 {
        return Err(err(world_var, "0", "the world size must be at least 1"));
    }
    let rank = number(vars, rank_var, &why)?;
    if rank >= world {
        return Err(err(
            rank_var,
            &rank.to_string(),
            format!("rank {rank} is not below {world_var}={world}"),
        ));
    }
    let local = match vars.get(local_var) {
        Some(_) => number(vars, local_var, &why)?,
        None if world == 1 => 0,
        None => return Err(err(local_var, "", format!("not set ({why})"))),
    };
    if local > rank {
        return Err(err(
            local_var,
            &local.to_string(),
            format!("local rank {local} is above the global rank {rank_var}={rank}"),
        ));
    }
    Ok((rank, world, local))
}

/// `MASTER_PORT`, or `default` when unset.
fn port(vars: Vars, default: Option<u16>) -> Result<u16, EnvError> {
    match (vars.get("MASTER_PORT"), default) {
        (Some(v), _) => match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(err("MASTER_PORT", v, "expected a TCP port in 1..=65535")),
        },
        (None, Some(p)) => Ok(p),
        (None, None) => Err(err("MASTER_PORT", "", "not set (rank 0 listens there)")),
    }
}

/// `MASTER_ADDR` (a non-empty host name or address), or an error saying `why` it is needed
/// when it is unset and `why` is given.
fn addr(vars: Vars, why: Option<&str>) -> Result<Option<String>, EnvError> {
    match (vars.get("MASTER_ADDR"), why) {
        (Some(v), _) => {
            let a = v.trim().trim_matches(['[', ']']);
            if a.is_empty() || a.contains(char::is_whitespace) {
                return Err(err("MASTER_ADDR", v, "expected a host name or address"));
            }
            Ok(Some(a.to_string()))
        }
        (None, Some(why)) => Err(err("MASTER_ADDR", "", format!("not set ({why})"))),
        (None, None) => Ok(None),
    }
}

fn torchrun(vars: Vars) -> Result<RankEnv, EnvError> {
    let (rank, world, local_rank) = triple(vars, ["RANK", "WORLD_SIZE", "LOCAL_RANK"], "torchrun")?;
    if let Some(v) = vars.get("LOCAL_WORLD_SIZE") {
        let n: usize = v
            .trim()
            .parse()
            .map_err(|_| err("LOCAL_WORLD_SIZE", v, "expected a positive integer"))?;
        if local_rank >= n || n > world {
            return Err(err(
                "LOCAL_WORLD_SIZE",
                v,
                format!("contradicts LOCAL_RANK={local_rank} and WORLD_SIZE={world}"),
            ));
        }
    }
    let (master_addr, master_port) = if world == 1 {
        let a = addr(vars, None)?.unwrap_or_else(|| "127.0.0.1".into());
        (a, port(vars, Some(DEFAULT_PORT))?)
    } else {
        let a = addr(vars, Some("torchrun sets it; rank 0 listens there"))?.unwrap_or_default();
        (a, port(vars, None)?)
    };
    Ok(RankEnv {
        rank,
        world,
        local_rank,
        master_addr,
        master_port,
        launcher: Launcher::Torchrun,
    })
}

fn open_mpi(vars: Vars) -> Result<RankEnv, EnvError> {
    let names = [
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
    ];
    let (rank, world, local_rank) = triple(vars, names, "mpirun")?;
    let why = (world > 1).then_some(
        "Open MPI names no rank 0 host: pass it with `mpirun -x MASTER_ADDR=<rank 0's host>`",
    );
    let master_addr = addr(vars, why)?.unwrap_or_else(|| "127.0.0.1".into());
    Ok(RankEnv {
        rank,
        world,
        local_rank,
        master_addr,
        master_port: port(vars, Some(DEFAULT_PORT))?,
        launcher: Launcher::OpenMpi,
    })
}

fn slurm(vars: Vars) -> Result<RankEnv, EnvError> {
    let names = ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"];
    let (rank, world, local_rank) = triple(vars, names, "srun")?;
    let master_addr = match addr(vars, None)? {
        Some(a) => a,
        None if world == 1 => "127.0.0.1".into(),
        None => {
            let var = if vars.contains_key("SLURM_JOB_NODELIST") {
                "SLURM_JOB_NODELIST"
            } else {
                "SLURM_NODELIST"
            };
            let list = get(vars, var, "srun sets it; its first host is rank 0's")?;
            first_host(list).map_err(|m| err(var, list, m))?
        }
    };
    // Jobs that share a node get different ports unless MASTER_PORT says otherwise.
    let derived = match vars.get("SLURM_JOB_ID") {
        Some(id) => {
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| err("SLURM_JOB_ID", id, "expected a job number"))?;
            20000 + (id % 20000) as u16
        }
        None => DEFAULT_PORT,
    };
    Ok(RankEnv {
        rank,
        world,
        local_rank,
        master_addr,
        master_port: port(vars, Some(derived))?,
        launcher: Launcher::Slurm,
    })
}

#[cfg(test)]
#[path = "env_tests.rs"]
mod tests;
