//! `vet-train comm-selftest` (hidden): run inside ranks that `vet-train launch` (or any
//! launcher) started. Each rank connects (environment -> rendezvous -> [`super::TcpComm`]) and
//! runs every collective on seeded data, checking each result bit for bit against the closed
//! form (the rank-order sum of every rank's inputs, which every rank can compute itself).
//! `--die-at RANK:ROUND` makes one rank exit mid-run, to show the others stop, naming it.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reference::comm::Comm;

use super::{connect_with, ConnectOptions, RankEnv, TcpOptions, Transport};

/// `vet-train comm-selftest` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct SelftestArgs {
    /// Rounds of the six collectives.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Elements per rank of each collective.
    #[arg(long, default_value_t = 4099)]
    pub len: usize,
    /// RANK:ROUND: that rank exits with code 3 at the start of that round.
    #[arg(long)]
    pub die_at: Option<String>,
    /// Pause between rounds (ms).
    #[arg(long, default_value_t = 0)]
    pub sleep_ms: u64,
    /// Seconds to wait for the other ranks to arrive.
    #[arg(long, default_value_t = 60.0)]
    pub rendezvous_timeout_s: f64,
    /// Seconds of silence after which a rank is taken as hung.
    #[arg(long, default_value_t = 10.0)]
    pub hang_s: f64,
}

/// Rank `rank`'s `i`-th input of collective `tag`: a seeded value in [-1, 1).
pub fn seeded(tag: u64, rank: usize, i: usize) -> f64 {
    let mut z = tag
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(((rank as u64) << 32) | i as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

fn inputs(tag: u64, rank: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| seeded(tag, rank, i) as f32).collect()
}

/// ((r0 + r1) + r2) + … in f32.
fn rank_order_sum(tag: u64, world: usize, n: usize) -> Vec<f32> {
    let mut acc = inputs(tag, 0, n);
    for r in 1..world {
        acc.iter_mut()
            .zip(inputs(tag, r, n))
            .for_each(|(a, b)| *a += b);
    }
    acc
}

/// Fails naming the first element whose bits differ.
fn same(what: &str, got: &[f32], want: &[f32]) -> Result<()> {
    if let Some(i) = (0..want.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        bail!(
            "{what}: element {i} is {}, the closed form says {}",
            got[i],
            want[i]
        );
    }
    Ok(())
}

fn parse_die_at(s: &str) -> Result<(usize, usize)> {
    let parsed = s
        .split_once(':')
        .and_then(|(r, k)| Some((r.parse().ok()?, k.parse().ok()?)));
    parsed.with_context(|| format!("--die-at {s}: expected RANK:ROUND, e.g. 1:2"))
}

/// One round of every collective, checked.
fn round(c: &mut dyn Comm, k: usize, n: usize) -> Result<()> {
    let (rank, world) = (c.rank(), c.world());
    let tag = 100 * k as u64;
    let mut x = inputs(tag, rank, n);
    c.all_reduce_sum(&mut x)?;
    same("all_reduce_sum", &x, &rank_order_sum(tag, world, n))?;

    let mut y: Vec<f64> = (0..n).map(|i| seeded(tag + 1, rank, i)).collect();
    c.all_reduce_sum_f64(&mut y)?;
    for (i, got) in y.iter().enumerate() {
        let want = (1..world).fold(seeded(tag + 1, 0, i), |a, r| a + seeded(tag + 1, r, i));
        if got.to_bits() != want.to_bits() {
            bail!("all_reduce_sum_f64: element {i} is {got}, the closed form says {want}");
        }
    }

    let input = inputs(tag + 2, rank, world * n);
    let mut out = vec![f32::NAN; n];
    c.reduce_scatter_sum(&input, &mut out)?;
    let full = rank_order_sum(tag + 2, world, world * n);
    same("reduce_scatter_sum", &out, &full[rank * n..(rank + 1) * n])?;

    let mut all = vec![f32::NAN; world * n];
    c.all_gather(&inputs(tag + 3, rank, n), &mut all)?;
    let want: Vec<f32> = (0..world).flat_map(|r| inputs(tag + 3, r, n)).collect();
    same("all_gather", &all, &want)?;

    let root = k % world;
    let mut b: Vec<u8> = (0..n).map(|i| (i * 31 + rank * 7 + k) as u8).collect();
    c.broadcast(&mut b, root)?;
    if (0..n).any(|i| b[i] != (i * 31 + root * 7 + k) as u8) {
        bail!("broadcast from rank {root}: the bytes differ from rank {root}'s");
    }
    c.barrier()?;
    Ok(())
}

/// Runs the self-test on this rank.
pub fn run(a: &SelftestArgs) -> Result<()> {
    crate::cli::install_stop_handlers();
    let die_at = a.die_at.as_deref().map(parse_die_at).transpose()?;
    let env = RankEnv::from_env().context("reading the launcher's environment")?;
    let opts = ConnectOptions {
        rendezvous_timeout: Duration::from_secs_f64(a.rendezvous_timeout_s),
        tcp: TcpOptions {
            hang: Duration::from_secs_f64(a.hang_s),
            ..TcpOptions::default()
        },
    };
    let started = Instant::now();
    let mut comm = connect_with(&env, Transport::Tcp, &opts)?;
    eprintln!(
        "comm-selftest: rank {} of {} is pid {}",
        env.rank,
        env.world,
        std::process::id()
    );
    for k in 0..a.rounds {
        if die_at == Some((env.rank, k)) {
            eprintln!(
                "comm-selftest: rank {} exits with code 3 at round {k}, on purpose",
                env.rank
            );
            std::process::exit(3);
        }
        // Ranks stop together: a signal seen by any rank stops all at the same round.
        let mut stop = [crate::cli::stop_signal().map_or(0.0, |_| 1.0)];
        comm.all_reduce_sum_f64(&mut stop)?;
        if stop[0] > 0.0 {
            eprintln!(
                "comm-selftest: rank {} stopped by a signal at round {k}",
                env.rank
            );
            return Ok(());
        }
        round(comm.as_mut(), k, a.len).with_context(|| format!("rank {} round {k}", env.rank))?;
        std::thread::sleep(Duration::from_millis(a.sleep_ms));
    }
    println!(
        "comm-selftest: rank {} of {}: {} rounds of 6 collectives × {} elements equal the closed form ({:.0} ms, {})",
        env.rank,
        env.world,
        a.rounds,
        a.len,
        started.elapsed().as_secs_f64() * 1e3,
        env.launcher.name()
    );
    Ok(())
}
