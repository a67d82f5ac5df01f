//! A spinning fork-join team for the short parallel regions of a decode step.
//!
//! A decode step of a small model is dozens of parallel regions of tens of microseconds each
//! (one per projection). On rayon's pool the second thread falls asleep between them, and the
//! futex that wakes it costs as much as the region: on the 2-core test machine the 130M int4
//! decode ran 172 tok/s on one thread and only 187 on two. [`with_team`] instead keeps the
//! pool's other threads spinning for the length of one forward pass (a few milliseconds), and
//! [`crate::par_for`] hands each region's tasks to them through one atomic word. They are woken
//! once per forward, not once per region.
//!
//! The split of work is the caller's, as with rayon: each task writes its own elements, so the
//! results are the same bits whichever thread runs a task. The leader (the thread that runs the
//! forward) claims tasks too, so a region completes even when no helper ever starts.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// A region's task function.
type Job<'a> = &'a (dyn Fn(usize) + Sync);

/// Bits of the task index and of the task count in [`Team::word`]; the generation takes the
/// rest, so a helper can never claim a task of a region other than the one it read.
const IDX_BITS: u32 = 16;
const MASK: u64 = (1 << IDX_BITS) - 1;
/// Most tasks one region hands out (longer regions are grouped into this many tasks).
const MAX_TASKS: usize = MASK as usize;
/// Spins of an idle helper between checks of the OS scheduler (`yield_now`).
const SPINS_PER_YIELD: u32 = 1 << 12;

/// The shared state of one team.
pub(crate) struct Team {
    /// `generation << 32 | tasks << 16 | next task`: the region now handed out.
    word: AtomicU64,
    /// The region's task function: a pointer to the leader's [`Job`] on its stack, read by a
    /// helper only after it claimed a task of that region (so the region is still running).
    job: AtomicPtr<Job<'static>>,
    /// Tasks of the current region finished by helpers.
    done: AtomicUsize,
    /// Set when the forward is over: helpers return.
    quit: AtomicBool,
    /// A helper's task panicked (the leader panics in its place).
    panicked: AtomicBool,
    /// Threads of the team, the leader included.
    members: usize,
    /// The leader thread (a helper job it runs itself returns at once).
    leader: std::thread::ThreadId,
}

thread_local! {
    /// The team this thread leads, if any.
    static CURRENT: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
}

fn split(w: u64) -> (u64, usize, usize) {
    (
        w >> (2 * IDX_BITS),
        ((w >> IDX_BITS) & MASK) as usize,
        (w & MASK) as usize,
    )
}

impl Team {
    fn new(members: usize) -> Team {
        Team {
            word: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            quit: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            members,
            leader: std::thread::current().id(),
        }
    }

    /// Claims the next task of generation `gen`, if one is left.
    fn claim(&self, gen: u64) -> Option<usize> {
        let mut cur = self.word.load(Ordering::Acquire);
        loop {
            let (g, n, i) = split(cur);
            if g != gen || i >= n {
                return None;
            }
            match self
                .word
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(i),
                Err(now) => cur = now,
            }
        }
    }

    /// Runs `f(0..n)` over the team; returns when every task has finished.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n > MAX_TASKS {
            // Group the tasks: task t runs indices [t·n/T, (t+1)·n/T).
            let t = MAX_TASKS;
            let grouped = |j: usize| (j * n / t..(j + 1) * n / t).for_each(f);
            return self.run(t, &grouped);
        }
        let slot: Job = f;
        // SAFETY (lifetime): helpers dereference the pointer only for a task of this
        // generation that they claimed, and this function returns only after every task of
        // the generation has finished, so `slot` outlives every use.
        let ptr = &slot as *const Job as *mut Job<'static>;
        self.done.store(0, Ordering::Relaxed);
        self.job.store(ptr, Ordering::Relaxed);
        let gen = (self.word.load(Ordering::Relaxed) >> (2 * IDX_BITS)) + 1;
        // Release: a helper that sees this word also sees the job and the reset count.
        self.word.store(
            gen << (2 * IDX_BITS) | (n as u64) << IDX_BITS,
            Ordering::Release,
        );
        // A panic of the leader's own task waits, like a helper's, for the region to end:
        // `slot` must outlive every helper's task.
        let (mut mine, mut err) = (0, None);
        while let Some(i) = self.claim(gen) {
            if let Err(e) = catch_unwind(AssertUnwindSafe(|| f(i))) {
                err.get_or_insert(e);
            }
            mine += 1;
        }
        while self.done.load(Ordering::Acquire) + mine < n {
            std::hint::spin_loop();
        }
        if let Some(e) = err {
            std::panic::resume_unwind(e);
        }
        if self.panicked.swap(false, Ordering::AcqRel) {
            panic!("a task of a parallel region panicked on a helper thread");
        }
    }

    /// A helper's loop: claims and runs tasks until the leader sets `quit`.
    fn serve(&self) {
        if std::thread::current().id() == self.leader {
            // The leader popped its own helper job (inside a rayon call of its own, or at the
            // end of the scope): serving here would wait for itself.
            return;
        }
        let mut idle = 0u32;
        loop {
            let (gen, n, i) = split(self.word.load(Ordering::Acquire));
            if i < n {
                let p = self.job.load(Ordering::Acquire);
                if let Some(i) = self.claim(gen) {
                    // SAFETY: `p` was read after a word of generation `gen`, and the claim
                    // succeeded in that generation. The leader stores a job, then its word,
                    // and a later job only after every task of `gen` (ours included) has
                    // finished, so `p` points at `gen`'s live job.
                    let f: Job = unsafe { *p };
                    if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                        self.panicked.store(true, Ordering::Release);
                    }
                    self.done.fetch_add(1, Ordering::Release);
                    idle = 0;
                }
                continue;
            }
            if self.quit.load(Ordering::Acquire) {
                return;
            }
            idle += 1;
            if idle.is_multiple_of(SPINS_PER_YIELD) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// Threads of the team this thread leads, if it leads one.
pub(crate) fn members() -> Option<usize> {
    let t = CURRENT.with(|c| c.get());
    // SAFETY: `CURRENT` is set only while `with_team` holds the team alive on this thread.
    (!t.is_null()).then(|| unsafe { (*t).members })
}

/// Runs `f(i)` for `i < n` on the team this thread leads; `false` (nothing run) if it leads
/// none.
pub(crate) fn run(n: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
    let t = CURRENT.with(|c| c.get());
    if t.is_null() {
        return false;
    }
    // SAFETY: as in `members`.
    unsafe { (*t).run(n, f) };
    true
}

/// Whether decode steps use a team: yes unless `SIMD_TEAM=0` (rayon's pool alone, to compare).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SIMD_TEAM").map_or(true, |v| v != "0"))
}

/// Runs `body` with the current rayon pool's other threads spinning as its team: inside,
/// [`crate::par_for`] hands tasks to them without waking a sleeping thread. On a pool of one
/// thread, or inside a team already, `body` just runs.
pub(crate) fn with_team<R: Send>(body: impl FnOnce() -> R + Send) -> R {
    let threads = crate::threads();
    if threads <= 1 || members().is_some() || !enabled() {
        return body();
    }
    let team = Team::new(threads);
    struct Leave<'a>(&'a Team);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(std::ptr::null()));
            self.0.quit.store(true, Ordering::Release);
        }
    }
    // One `join` per helper: each pushes a `serve` job (on the stack, no allocation) for the
    // pool's sleeping threads to take, and the leader goes on with the next level, the last
    // running `body`. When `body` is done, `quit` lets every helper return; a job no thread
    // took is popped by the leader itself, where `serve` returns at once.
    fn level<R: Send>(team: &Team, helpers: usize, body: impl FnOnce() -> R + Send) -> R {
        if helpers == 0 {
            let _leave = Leave(team);
            CURRENT.with(|c| c.set(team));
            body()
        } else {
            rayon::join(|| level(team, helpers - 1, body), || team.serve()).0
        }
    }
    level(&team, threads - 1, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn pool(n: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap()
    }

    #[test]
    fn every_task_of_every_region_runs_once() {
        for threads in [1, 2, 3] {
            pool(threads).install(|| {
                with_team(|| {
                    assert_eq!(members().unwrap_or(1), threads);
                    // Regions of many sizes back to back, some longer than one word holds.
                    for (k, n) in [0, 1, 2, 7, 64, 1000, MAX_TASKS + 3, 5]
                        .into_iter()
                        .enumerate()
                    {
                        let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                        crate::par_for(n, |i| {
                            hits[i].fetch_add(k as u32 + 1, Ordering::Relaxed);
                        });
                        for (i, h) in hits.iter().enumerate() {
                            assert_eq!(
                                h.load(Ordering::Relaxed),
                                k as u32 + 1,
                                "region {k}, task {i} of {n}"
                            );
                        }
                    }
                })
            });
        }
    }

    #[test]
    fn a_helper_takes_tasks_and_runs_each_once() {
        // With two threads, over many regions of slow tasks, tasks run off the leader too,
        // and still each exactly once.
        pool(2).install(|| {
            with_team(|| {
                let leader = std::thread::current().id();
                let off = AtomicU32::new(0);
                for r in 0..200u32 {
                    let hits: Vec<AtomicU32> = (0..8).map(|_| AtomicU32::new(0)).collect();
                    crate::par_for(8, |i| {
                        std::thread::sleep(std::time::Duration::from_micros(20));
                        hits[i].fetch_add(1, Ordering::Relaxed);
                        if std::thread::current().id() != leader {
                            off.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                    for (i, h) in hits.iter().enumerate() {
                        assert_eq!(h.load(Ordering::Relaxed), 1, "region {r}, task {i}");
                    }
                }
                assert!(off.load(Ordering::Relaxed) > 0, "no task ran on the helper");
            })
        });
    }

    #[test]
    fn a_panicking_task_panics_the_leader() {
        let r = std::panic::catch_unwind(|| {
            pool(2).install(|| {
                with_team(|| {
                    for _ in 0..50 {
                        crate::par_for(4, |i| assert!(i != 3, "task 3"));
                    }
                })
            })
        });
        assert!(r.is_err());
    }
}
