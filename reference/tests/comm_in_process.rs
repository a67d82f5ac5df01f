//! `reference::comm::InProcess`: every collective against a plain computation, rank-order
//! sums bit for bit, and errors (never hangs) for lengths that disagree and peers that leave.

use std::thread;
use std::time::{Duration, Instant};

use reference::comm::{Comm, CommResult, InProcess};
use reference::rng::Rng;

/// Runs `f` on every rank of a fresh group of `world`, each on its own thread; results in
/// rank order.
fn on_ranks<R: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(&mut InProcess) -> R + Send + Sync + Copy + 'static,
) -> Vec<R> {
    let handles: Vec<_> = InProcess::group_with_timeout(world, timeout)
        .into_iter()
        .map(|mut c| thread::spawn(move || f(&mut c)))
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Rank `r`'s random input of `n` values.
fn input(r: usize, n: usize) -> Vec<f32> {
    let mut rng = Rng::new(1000 + r as u64);
    (0..n).map(|_| rng.uniform(-3.0, 3.0) as f32).collect()
}

/// The rank-order sum `((r0 + r1) + r2) + ...`.
fn rank_order_sum(world: usize, n: usize) -> Vec<f32> {
    let mut s = input(0, n);
    for r in 1..world {
        s.iter_mut().zip(input(r, n)).for_each(|(a, b)| *a += b);
    }
    s
}

const T: Duration = Duration::from_secs(20);

#[test]
fn all_reduce_is_the_rank_order_sum_on_every_rank() {
    for world in [1, 2, 3, 4] {
        let want = rank_order_sum(world, 1001);
        let got = on_ranks(world, T, |c| {
            let mut d = input(c.rank(), 1001);
            c.all_reduce_sum(&mut d).unwrap();
            d
        });
        for g in got {
            assert_eq!(g, want, "world {world}");
        }
        // The order matters in f32: a reversed sum differs somewhere for these inputs.
        if world >= 3 {
            let mut rev = input(world - 1, 1001);
            for r in (0..world - 1).rev() {
                rev.iter_mut()
                    .zip(input(r, 1001))
                    .for_each(|(a, b)| *a += b);
            }
            assert_ne!(rev, want, "inputs too tame to show the order");
        }
    }
}

#[test]
fn f64_all_reduce_reduce_scatter_all_gather_broadcast() {
    let world = 3;
    let n = 7;
    let got = on_ranks(world, T, move |c| {
        let r = c.rank();
        let mut f = vec![r as f64 + 0.5, 2.0];
        c.all_reduce_sum_f64(&mut f).unwrap();
        let all = input(r, n * world);
        let mut part = vec![0.0; n];
        c.reduce_scatter_sum(&all, &mut part).unwrap();
        let mut gathered = vec![0.0; n * world];
        c.all_gather(&input(r, n), &mut gathered).unwrap();
        let mut bytes = vec![r as u8; 5];
        c.broadcast(&mut bytes, 1).unwrap();
        c.barrier().unwrap();
        (f, part, gathered, bytes)
    });
    let sum = rank_order_sum(world, n * world);
    let gathered: Vec<f32> = (0..world).flat_map(|r| input(r, n)).collect();
    for (r, (f, part, g, b)) in got.into_iter().enumerate() {
        assert_eq!(f, vec![0.5 + 1.5 + 2.5, 6.0]);
        assert_eq!(part, sum[r * n..(r + 1) * n].to_vec(), "rank {r}'s chunk");
        assert_eq!(g, gathered);
        assert_eq!(b, vec![1u8; 5]);
    }
}

#[test]
fn many_rounds_in_a_row_stay_in_step() {
    let got = on_ranks(4, T, |c| {
        let mut acc = 0.0f64;
        for i in 0..200 {
            let mut d = [c.rank() as f64 * i as f64];
            c.all_reduce_sum_f64(&mut d).unwrap();
            acc += d[0];
        }
        acc
    });
    let want: f64 = (0..200).map(|i| 6.0 * i as f64).sum();
    assert!(got.iter().all(|&g| g == want), "{got:?} vs {want}");
}

#[test]
fn lengths_that_disagree_fail_on_every_rank() {
    let got: Vec<CommResult<()>> = on_ranks(3, T, |c| {
        let mut d = vec![1.0; 4 + c.rank() / 2];
        c.all_reduce_sum(&mut d)
    });
    for (r, g) in got.iter().enumerate() {
        let e = g.as_ref().expect_err("mismatched lengths must fail");
        assert_eq!(e.rank, r);
        assert!(e.to_string().contains("lengths"), "{e}");
    }
    let got: Vec<CommResult<()>> = on_ranks(2, T, |c| {
        let mut out = vec![0.0; 3];
        c.reduce_scatter_sum(&[1.0; 5], &mut out)
    });
    assert!(got.iter().all(|g| g.is_err()), "{got:?}");
}

#[test]
fn a_dropped_peer_is_an_error_not_a_hang() {
    let mut group = InProcess::group_with_timeout(3, Duration::from_secs(60));
    drop(group.pop()); // rank 2 leaves
    let start = Instant::now();
    let handles: Vec<_> = group
        .into_iter()
        .map(|mut c| thread::spawn(move || c.barrier()))
        .collect();
    for h in handles {
        let e = h.join().unwrap().expect_err("rank 2 is gone");
        assert_eq!(e.peer, Some(2), "{e}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took the timeout"
    );
}

#[test]
fn a_missing_peer_times_out_naming_it() {
    let mut group = InProcess::group_with_timeout(3, Duration::from_millis(300));
    let _late = group.pop(); // rank 2 never calls, but is still alive
    let handles: Vec<_> = group
        .into_iter()
        .map(|mut c| thread::spawn(move || c.barrier()))
        .collect();
    for h in handles {
        let e = h.join().unwrap().expect_err("rank 2 never came");
        assert_eq!(e.peer, Some(2), "{e}");
        assert!(e.msg.contains("timed out"), "{e}");
    }
}
