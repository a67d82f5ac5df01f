//! How the ranks find each other: rank 0 listens at `MASTER_ADDR:MASTER_PORT`, every other
//! rank connects (retrying until the timeout) and says who it is; once all have arrived, rank 0
//! hands each an opaque blob (NCCL's 128-byte unique id on GPU runs, nothing on CPU runs).
//! The connections stay open for [`super::tcp::TcpComm`], a star around rank 0.
//!
//! Nothing waits forever: rank 0 gives up after the timeout and names the ranks that never
//! arrived (and tells those that did); a rank that cannot reach rank 0 names the address. A
//! rank that disagrees on the world size, speaks another protocol or claims a taken rank fails
//! the whole rendezvous.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::env::{Launcher, RankEnv};

const MAGIC: &[u8; 8] = b"VETRDZV\0";
const VERSION: u32 = 1;
/// Longest blob or error message rank 0 sends.
const MAX_BLOB: u32 = 1 << 20;

/// Why the ranks could not meet.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error("rendezvous at {addr}: rank(s) {missing:?} of {world} never arrived within {secs:.0} s{hint}")]
    Missing {
        addr: String,
        missing: Vec<usize>,
        world: usize,
        secs: f64,
        hint: &'static str,
    },
    #[error("rendezvous: rank {rank} could not reach rank 0 at {addr} within {secs:.0} s (last error: {last})")]
    Unreachable {
        rank: usize,
        addr: String,
        secs: f64,
        last: String,
    },
    #[error("rendezvous at {addr}: {msg}")]
    Mismatch { addr: String, msg: String },
    #[error("rendezvous at {addr}: rank 0 gave up: {msg}")]
    Refused { addr: String, msg: String },
    #[error("rendezvous at {addr}: {what}: {source}")]
    Io {
        addr: String,
        what: String,
        source: io::Error,
    },
}

/// The outcome on one rank.
pub struct Rendezvous {
    pub rank: usize,
    pub world: usize,
    /// What rank 0 handed out.
    pub blob: Vec<u8>,
    /// Rank 0: a connection to every other rank, in rank order. Others: one, to rank 0.
    pub links: Vec<(usize, TcpStream)>,
}

/// Meets the other ranks of `env`. `blob` is what rank 0 hands out (ignored elsewhere).
pub fn rendezvous(
    env: &RankEnv,
    blob: &[u8],
    timeout: Duration,
) -> Result<Rendezvous, RendezvousError> {
    if env.world == 1 {
        return Ok(Rendezvous {
            rank: 0,
            world: 1,
            blob: blob.to_vec(),
            links: Vec::new(),
        });
    }
    if env.rank == 0 {
        host(env, blob, timeout)
    } else {
        join(env, timeout)
    }
}

fn io_err(env: &RankEnv, what: impl Into<String>) -> impl FnOnce(io::Error) -> RendezvousError {
    let addr = env.master();
    let what = what.into();
    move |source| RendezvousError::Io { addr, what, source }
}

/// Where rank 0 binds: the loopback address when MASTER_ADDR is one (nothing outside can
/// connect), else every interface, as torchrun's store does.
fn bind_addr(env: &RankEnv) -> SocketAddr {
    let resolved = (env.master_addr.as_str(), env.master_port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next());
    match resolved {
        Some(a) if a.ip().is_loopback() => a,
        Some(SocketAddr::V6(_)) => (Ipv6Addr::UNSPECIFIED, env.master_port).into(),
        _ => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), env.master_port).into(),
    }
}

/// Rank 0: accept every other rank, then hand out the blob.
fn host(env: &RankEnv, blob: &[u8], timeout: Duration) -> Result<Rendezvous, RendezvousError> {
    let at = bind_addr(env);
    let listener = TcpListener::bind(at).map_err(io_err(
        env,
        format!("rank 0 cannot listen on {at} (is MASTER_PORT taken by another job?)"),
    ))?;
    listener
        .set_nonblocking(true)
        .map_err(io_err(env, "listener"))?;
    let deadline = Instant::now() + timeout;
    let mut peers: Vec<Option<TcpStream>> = (0..env.world).map(|_| None).collect();
    let result = accept_all(env, &listener, &mut peers, deadline, timeout);
    let arrived = peers
        .iter_mut()
        .enumerate()
        .filter_map(|(r, s)| s.take().map(|s| (r, s)));
    let mut links: Vec<(usize, TcpStream)> = arrived.collect();
    let reply = match &result {
        Ok(()) => Ok(blob),
        Err(e) => Err(e.to_string()),
    };
    for (_, s) in &mut links {
        // A peer that cannot take the reply finds out on its own read.
        let _ = send_reply(s, reply.as_ref().map(|b| *b).map_err(|m| m.as_str()));
    }
    result?;
    Ok(Rendezvous {
        rank: 0,
        world: env.world,
        blob: blob.to_vec(),
        links,
    })
}

fn accept_all(
    env: &RankEnv,
    listener: &TcpListener,
    peers: &mut [Option<TcpStream>],
    deadline: Instant,
    timeout: Duration,
) -> Result<(), RendezvousError> {
    let mismatch = |msg: String| RendezvousError::Mismatch {
        addr: env.master(),
        msg,
    };
    while peers.iter().skip(1).any(|p| p.is_none()) {
        let (mut s, from) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing = (1..env.world).filter(|r| peers[*r].is_none()).collect();
                    return Err(RendezvousError::Missing {
                        addr: env.master(),
                        missing,
                        world: env.world,
                        secs: timeout.as_secs_f64(),
                        hint: if env.launcher == Launcher::Slurm {
                            " (under SLURM run one task per GPU with srun, not in the batch script itself)"
                        } else {
                            ""
                        },
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(io_err(env, "accepting a rank")(e)),
        };
        s.set_nonblocking(false).map_err(io_err(env, "socket"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io_err(env, "socket"))?;
        let hello =
            read_hello(&mut s).map_err(|e| mismatch(format!("{from} sent no valid hello: {e}")));
        let rank = match hello.and_then(|h| admit(env, h, from, peers).map_err(mismatch)) {
            Ok(rank) => rank,
            Err(e) => {
                let _ = send_reply(&mut s, Err(&e.to_string()));
                return Err(e);
            }
        };
        peers[rank] = Some(s);
    }
    Ok(())
}

/// The rank a hello claims, if it fits this job.
fn admit(
    env: &RankEnv,
    (version, world, rank): (u32, usize, usize),
    from: SocketAddr,
    peers: &[Option<TcpStream>],
) -> Result<usize, String> {
    if version != VERSION {
        return Err(format!(
            "{from} speaks protocol {version}, rank 0 speaks {VERSION}"
        ));
    }
    if world != env.world {
        return Err(format!(
            "rank {rank} at {from} has world size {world}, rank 0 has {}",
            env.world
        ));
    }
    if rank == 0 || rank >= env.world {
        return Err(format!(
            "{from} claims rank {rank}, outside 1..{}",
            env.world
        ));
    }
    if peers[rank].is_some() {
        return Err(format!(
            "two processes claim rank {rank} (the second at {from})"
        ));
    }
    Ok(rank)
}

fn read_hello(s: &mut TcpStream) -> io::Result<(u32, usize, usize)> {
    let mut b = [0u8; 20];
    s.read_exact(&mut b)?;
    if &b[..8] != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a Vet-Mamba rank (bad magic)",
        ));
    }
    let word = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    Ok((word(8), word(12) as usize, word(16) as usize))
}

fn send_reply(s: &mut TcpStream, reply: Result<&[u8], &str>) -> io::Result<()> {
    let (status, body) = match reply {
        Ok(b) => (0u8, b),
        Err(m) => (1u8, m.as_bytes()),
    };
    let mut msg = MAGIC.to_vec();
    msg.push(status);
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    s.write_all(&msg)
}

/// Another rank: connect to rank 0 (retrying), say who we are, take the blob.
fn join(env: &RankEnv, timeout: Duration) -> Result<Rendezvous, RendezvousError> {
    let deadline = Instant::now() + timeout;
    let mut s = connect_retrying(env, deadline, timeout)?;
    let mut hello = MAGIC.to_vec();
    for w in [VERSION, env.world as u32, env.rank as u32] {
        hello.extend_from_slice(&w.to_le_bytes());
    }
    s.write_all(&hello).map_err(io_err(env, "sending hello"))?;
    // Rank 0 answers by its own deadline, which is at most `timeout` after we connected.
    s.set_read_timeout(Some(timeout + Duration::from_secs(10)))
        .map_err(io_err(env, "socket"))?;
    let mut head = [0u8; 13];
    s.read_exact(&mut head).map_err(io_err(
        env,
        format!("rank {} waiting for rank 0's answer", env.rank),
    ))?;
    let len = u32::from_le_bytes(head[9..13].try_into().expect("4 bytes"));
    if &head[..8] != MAGIC || len > MAX_BLOB {
        return Err(RendezvousError::Mismatch {
            addr: env.master(),
            msg: "the answer is not from a Vet-Mamba rank 0 of this protocol".into(),
        });
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body)
        .map_err(io_err(env, "reading rank 0's answer"))?;
    if head[8] != 0 {
        return Err(RendezvousError::Refused {
            addr: env.master(),
            msg: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    Ok(Rendezvous {
        rank: env.rank,
        world: env.world,
        blob: body,
        links: vec![(0, s)],
    })
}

fn connect_retrying(
    env: &RankEnv,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, RendezvousError> {
    let mut last = String::from("none");
    loop {
        let addrs = (env.master_addr.as_str(), env.master_port).to_socket_addrs();
        match addrs {
            Ok(addrs) => {
                for a in addrs {
                    match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = format!("{a}: {e}"),
                    }
                }
            }
            Err(e) => last = format!("cannot resolve {}: {e}", env.master_addr),
        }
        if Instant::now() >= deadline {
            return Err(RendezvousError::Unreachable {
                rank: env.rank,
                addr: env.master(),
                secs: timeout.as_secs_f64(),
                last,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
