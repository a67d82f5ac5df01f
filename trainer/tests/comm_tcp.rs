//! `TcpComm` and the rendezvous with ranks as threads on loopback sockets: every collective
//! at world sizes 1 to 4 equals the rank-order sum bit for bit; mismatched calls, a killed
//! rank, a hung rank and a missing rank are errors that name the rank, on every survivor, in
//! bounded time.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use reference::comm::{Comm, CommError};
use trainer::launch::{rendezvous, Launcher, RankEnv, RendezvousError, TcpComm, TcpOptions};

/// A port free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn env(rank: usize, world: usize, port: u16) -> RankEnv {
    RankEnv {
        rank,
        world,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        launcher: Launcher::Torchrun,
    }
}

const QUICK: TcpOptions = TcpOptions {
    hang: Duration::from_secs(2),
    heartbeat: Duration::from_millis(200),
};

/// Runs `f(comm)` on `world` threads joined by a real rendezvous; returns each rank's result.
fn with_ranks<R: Send + 'static>(
    world: usize,
    opts: TcpOptions,
    f: impl Fn(TcpComm) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    let port = free_port();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let f = f.clone();
            std::thread::spawn(move || {
                let r = rendezvous(
                    &env(rank, world, port),
                    b"unique-id",
                    Duration::from_secs(20),
                )
                .unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                assert_eq!(r.blob, b"unique-id");
                f(TcpComm::new(r, opts).unwrap())
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Rank `rank`'s `i`-th input of collective `tag`: a seeded value in [-1, 1).
fn value(tag: u64, rank: usize, i: usize) -> f64 {
    let mut z = tag
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(((rank as u64) << 32) | i as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

fn inputs(tag: u64, rank: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| value(tag, rank, i) as f32).collect()
}

/// The sum over ranks in rank order, ((r0 + r1) + r2) + …, in f32.
fn rank_order_sum(tag: u64, world: usize, n: usize) -> Vec<f32> {
    let mut acc = inputs(tag, 0, n);
    for r in 1..world {
        for (a, b) in acc.iter_mut().zip(inputs(tag, r, n)) {
            *a += b;
        }
    }
    acc
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn every_collective_equals_the_rank_order_sum_at_world_1_to_4() {
    for world in [1, 2, 3, 4] {
        with_ranks(world, QUICK, move |mut c| {
            let rank = c.rank();
            assert_eq!(c.world(), world);
            let n = 1013;
            let mut x = inputs(1, rank, n);
            c.all_reduce_sum(&mut x).unwrap();
            assert_eq!(
                bits(&x),
                bits(&rank_order_sum(1, world, n)),
                "all_reduce rank {rank}"
            );

            let mut y: Vec<f64> = (0..37).map(|i| value(2, rank, i)).collect();
            c.all_reduce_sum_f64(&mut y).unwrap();
            let want: Vec<f64> = (0..37)
                .map(|i| (1..world).fold(value(2, 0, i), |a, r| a + value(2, r, i)))
                .collect();
            assert_eq!(y, want, "all_reduce_f64 rank {rank}");

            let chunk = 7; // world × 7: no power of two
            let input = inputs(3, rank, world * chunk);
            let mut out = vec![f32::NAN; chunk];
            c.reduce_scatter_sum(&input, &mut out).unwrap();
            let full = rank_order_sum(3, world, world * chunk);
            assert_eq!(
                bits(&out),
                bits(&full[rank * chunk..(rank + 1) * chunk]),
                "reduce_scatter rank {rank}"
            );

            let mine = inputs(4, rank, 5);
            let mut all = vec![f32::NAN; world * 5];
            c.all_gather(&mine, &mut all).unwrap();
            let want: Vec<f32> = (0..world).flat_map(|r| inputs(4, r, 5)).collect();
            assert_eq!(bits(&all), bits(&want), "all_gather rank {rank}");

            for root in [world - 1, 0] {
                let mut b: Vec<u8> = (0..300).map(|i| (i * 7 + rank * 13) as u8).collect();
                c.broadcast(&mut b, root).unwrap();
                let want: Vec<u8> = (0..300).map(|i| (i * 7 + root * 13) as u8).collect();
                assert_eq!(b, want, "broadcast from {root} on rank {rank}");
            }
            c.barrier().unwrap();
        });
    }
}

#[test]
fn one_rank_still_checks_lengths() {
    with_ranks(1, QUICK, |mut c| {
        let input = inputs(7, 0, 6);
        let mut out = vec![0.0f32; 5];
        c.reduce_scatter_sum(&input, &mut out)
            .expect_err("input is not world × output");
        c.all_gather(&input, &mut out)
            .expect_err("output is not world × input");
        c.broadcast(&mut [1u8, 2], 1).expect_err("no rank 1");
    });
}

#[test]
fn mismatched_calls_fail_on_every_rank() {
    let errs = with_ranks(3, QUICK, |mut c| {
        let n = if c.rank() == 2 { 5 } else { 6 };
        let mut x = inputs(5, c.rank(), n);
        c.all_reduce_sum(&mut x).expect_err("lengths differ")
    });
    for e in &errs {
        assert!(e.to_string().contains("rank 2"), "{e}");
    }
    let errs = with_ranks(2, QUICK, |mut c| {
        if c.rank() == 1 {
            c.barrier().expect_err("ranks called different collectives")
        } else {
            let mut x = inputs(6, 0, 4);
            c.all_reduce_sum(&mut x)
                .expect_err("ranks called different collectives")
        }
    });
    for e in &errs {
        assert!(
            e.msg.contains("barrier") && e.msg.contains("all_reduce_sum"),
            "{e}"
        );
    }
}

/// World `world`: rank `victim` is cut off after one good collective; the survivors' errors.
fn kill(world: usize, victim: usize) -> Vec<Option<(CommError, Duration)>> {
    with_ranks(world, QUICK, move |mut c| {
        let rank = c.rank();
        let mut x = inputs(7, rank, 64);
        c.all_reduce_sum(&mut x).unwrap();
        if rank == victim {
            std::thread::sleep(Duration::from_millis(100));
            c.sever();
            return None;
        }
        let t = Instant::now();
        let e = c.all_reduce_sum(&mut x).expect_err("a rank is dead");
        // The error sticks.
        assert_eq!(c.barrier().expect_err("failed comm"), e);
        Some((e, t.elapsed()))
    })
}

#[test]
fn a_killed_rank_is_named_on_every_survivor() {
    for (world, victim) in [(2, 1), (3, 1), (4, 3), (4, 0)] {
        for (rank, got) in kill(world, victim).into_iter().enumerate() {
            let Some((e, took)) = got else {
                assert_eq!(rank, victim);
                continue;
            };
            assert_eq!(e.peer, Some(victim), "world {world}, rank {rank}: {e}");
            assert!(e.to_string().contains(&format!("rank {victim}")), "{e}");
            assert!(
                took < QUICK.hang,
                "world {world} rank {rank}: {took:?} ({e})"
            );
        }
    }
}

#[test]
fn a_hung_rank_is_named_after_the_hang_timeout() {
    // Rank 1 meets rank 0 but then neither sends data nor heartbeats (a stopped process).
    let port = free_port();
    let hung = std::thread::spawn(move || {
        let r = rendezvous(&env(1, 2, port), b"", Duration::from_secs(20)).unwrap();
        std::thread::sleep(Duration::from_secs(6));
        drop(r);
    });
    let r = rendezvous(&env(0, 2, port), b"", Duration::from_secs(20)).unwrap();
    let mut c = TcpComm::new(r, QUICK).unwrap();
    let t = Instant::now();
    let e = c.all_reduce_sum(&mut [1.0, 2.0]).expect_err("rank 1 hangs");
    let took = t.elapsed();
    assert_eq!(e.peer, Some(1), "{e}");
    assert!(e.msg.contains("heartbeat"), "{e}");
    assert!(took >= QUICK.hang && took < QUICK.hang * 2, "{took:?}");
    hung.join().unwrap();
}

#[test]
fn a_missing_rank_is_named_with_the_address() {
    let port = free_port();
    let t = Instant::now();
    let one = std::thread::spawn(move || rendezvous(&env(1, 3, port), b"", Duration::from_secs(1)));
    let e0 = rendezvous(&env(0, 3, port), b"x", Duration::from_secs(1))
        .err()
        .expect("rank 2 missing");
    let e1 = one.join().unwrap().err().expect("rank 2 missing");
    assert!(t.elapsed() < Duration::from_secs(5));
    let addr = format!("127.0.0.1:{port}");
    assert!(
        matches!(&e0, RendezvousError::Missing { missing, .. } if missing == &vec![2]),
        "{e0}"
    );
    assert!(
        e0.to_string().contains(&addr) && e0.to_string().contains("[2]"),
        "{e0}"
    );
    assert!(
        matches!(e1, RendezvousError::Refused { .. }) && e1.to_string().contains("[2]"),
        "{e1}"
    );

    // Nobody listening: the joining rank names the address it tried.
    let e = rendezvous(&env(2, 3, free_port()), b"", Duration::from_millis(500))
        .err()
        .expect("no rank 0");
    assert!(
        matches!(e, RendezvousError::Unreachable { rank: 2, .. }),
        "{e}"
    );
}

#[test]
fn a_world_size_mismatch_fails_the_rendezvous() {
    let port = free_port();
    let other =
        std::thread::spawn(move || rendezvous(&env(1, 3, port), b"", Duration::from_secs(5)));
    let e0 = rendezvous(&env(0, 2, port), b"", Duration::from_secs(5))
        .err()
        .expect("mismatch");
    let e1 = other.join().unwrap().err().expect("mismatch");
    assert!(
        e0.to_string().contains("world size 3, rank 0 has 2"),
        "{e0}"
    );
    assert!(e1.to_string().contains("world size 3"), "{e1}");
}
