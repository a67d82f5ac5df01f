//! [`InProcess`]: the ranks of a job as threads of one process, for tests. Every collective
//! is an exchange through shared memory: each rank deposits its contribution, waits until
//! every rank has, and computes its result from all of them in rank order, so the sums are
//! `((r0 + r1) + r2) + ...` bit for bit on every rank.
//!
//! Never a hang: a rank whose peers do not arrive within the timeout gets an error naming
//! them; a peer that was dropped (its thread ended or panicked) is an error at once; lengths
//! or collectives that disagree between ranks are an error on every rank.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{length_error, world_multiple_mismatch, Comm, CommError, CommResult};

/// How long a rank waits for its peers by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// One rank's contribution to a collective.
#[derive(Debug)]
struct Deposit {
    op: &'static str,
    /// The lengths that must agree between ranks (the op's own consistency is checked too).
    lens: (usize, usize),
    data: Payload,
}

#[derive(Debug)]
enum Payload {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<u8>),
    None,
}

#[derive(Debug, Default)]
struct State {
    /// Deposits of the round being collected.
    slots: Vec<Option<Arc<Deposit>>>,
    arrived: usize,
    /// Ranks that have read the complete round; the round closes when all have.
    departed: usize,
    /// Every rank has deposited: the round is being read.
    ready: bool,
    round: u64,
    /// Ranks whose handle was dropped.
    gone: Vec<bool>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

/// One rank of an in-process group (see the module docs). Make the group with
/// [`InProcess::group`] and move each handle onto its own thread.
#[derive(Debug)]
pub struct InProcess {
    rank: usize,
    shared: Arc<Shared>,
}

impl InProcess {
    /// `world` connected ranks, rank `r` at index `r`, with [`DEFAULT_TIMEOUT`].
    pub fn group(world: usize) -> Vec<InProcess> {
        Self::group_with_timeout(world, DEFAULT_TIMEOUT)
    }

    /// [`InProcess::group`] with another timeout for a peer to arrive.
    pub fn group_with_timeout(world: usize, timeout: Duration) -> Vec<InProcess> {
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                slots: (0..world).map(|_| None).collect(),
                gone: vec![false; world],
                ..State::default()
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| InProcess {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked holding the lock leaves consistent state (every update is
        // a few assignments), so a poisoned lock is still usable.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self, op: &'static str, peer: Option<usize>, msg: String) -> CommError {
        CommError {
            rank: self.rank,
            peer,
            op,
            msg,
        }
    }

    /// Deposits `d` and returns every rank's deposit of this round, in rank order.
    fn exchange(&self, d: Deposit) -> CommResult<Vec<Arc<Deposit>>> {
        let op = d.op;
        let deadline = Instant::now() + self.shared.timeout;
        let mut st = self.lock();
        // Wait for the previous round to be read by everyone.
        while st.ready {
            st = self.wait(st, op, deadline)?;
        }
        let round = st.round;
        st.slots[self.rank] = Some(Arc::new(d));
        st.arrived += 1;
        if st.arrived == self.shared.world {
            st.ready = true;
            self.shared.cv.notify_all();
        }
        while !(st.ready && st.round == round) {
            st = self.wait(st, op, deadline)?;
        }
        let all: Vec<Arc<Deposit>> = st.slots.iter().flatten().cloned().collect();
        st.departed += 1;
        if st.departed == self.shared.world {
            st.slots.iter_mut().for_each(|s| *s = None);
            st.arrived = 0;
            st.departed = 0;
            st.ready = false;
            st.round += 1;
            self.shared.cv.notify_all();
        }
        drop(st);
        check_agree(self.rank, &all)?;
        Ok(all)
    }

    /// One wait on the condition variable; an error when a rank that has not deposited was
    /// dropped, or when the deadline passed.
    fn wait<'a>(
        &self,
        st: MutexGuard<'a, State>,
        op: &'static str,
        deadline: Instant,
    ) -> CommResult<MutexGuard<'a, State>> {
        let missing: Vec<usize> = (0..self.shared.world)
            .filter(|&r| st.slots[r].is_none())
            .collect();
        if let Some(&r) = missing.iter().find(|&&r| st.gone[r]) {
            return Err(self.err(
                op,
                Some(r),
                "the peer left the group (its handle was dropped) before this collective".into(),
            ));
        }
        let now = Instant::now();
        if now >= deadline {
            let who = missing.first().copied();
            return Err(self.err(
                op,
                who,
                format!(
                    "timed out after {:?} waiting for rank(s) {missing:?}",
                    self.shared.timeout
                ),
            ));
        }
        let (st, _) = self
            .shared
            .cv
            .wait_timeout(st, (deadline - now).min(Duration::from_millis(200)))
            .unwrap_or_else(|e| e.into_inner());
        Ok(st)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let mut st = self.lock();
        st.gone[self.rank] = true;
        self.shared.cv.notify_all();
    }
}

/// Every deposit names the same collective with the same lengths.
fn check_agree(rank: usize, all: &[Arc<Deposit>]) -> CommResult<()> {
    let first = &all[0];
    for (r, d) in all.iter().enumerate() {
        if d.op != first.op || d.lens != first.lens {
            return Err(length_error(
                rank,
                first.op,
                format!(
                    "rank 0 called {} with lengths {:?} but rank {r} called {} with lengths {:?}",
                    first.op, first.lens, d.op, d.lens
                ),
            ));
        }
    }
    Ok(())
}

fn f32s(d: &Deposit) -> &[f32] {
    match &d.data {
        Payload::F32(v) => v,
        _ => &[],
    }
}

impl Comm for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> CommResult<()> {
        let all = self.exchange(Deposit {
            op: "all_reduce_sum",
            lens: (data.len(), 0),
            data: Payload::F32(data.to_vec()),
        })?;
        data.copy_from_slice(f32s(&all[0]));
        for d in &all[1..] {
            data.iter_mut().zip(f32s(d)).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> CommResult<()> {
        let all = self.exchange(Deposit {
            op: "all_reduce_sum_f64",
            lens: (data.len(), 0),
            data: Payload::F64(data.to_vec()),
        })?;
        let get = |d: &Deposit| match &d.data {
            Payload::F64(v) => v.clone(),
            _ => Vec::new(),
        };
        data.copy_from_slice(&get(&all[0]));
        for d in &all[1..] {
            data.iter_mut().zip(get(d)).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, input: &[f32], output: &mut [f32]) -> CommResult<()> {
        let op = "reduce_scatter_sum";
        let all = self.exchange(Deposit {
            op,
            lens: (input.len(), output.len()),
            data: Payload::F32(input.to_vec()),
        })?;
        let n = output.len();
        let world = self.shared.world;
        if let Some(msg) = world_multiple_mismatch(("input", input.len()), world, ("output", n)) {
            return Err(length_error(self.rank, op, msg));
        }
        let chunk = self.rank * n..(self.rank + 1) * n;
        output.copy_from_slice(&f32s(&all[0])[chunk.clone()]);
        for d in &all[1..] {
            let src = &f32s(d)[chunk.clone()];
            output.iter_mut().zip(src).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> CommResult<()> {
        let op = "all_gather";
        let all = self.exchange(Deposit {
            op,
            lens: (input.len(), output.len()),
            data: Payload::F32(input.to_vec()),
        })?;
        let n = input.len();
        let world = self.shared.world;
        if let Some(msg) = world_multiple_mismatch(("output", output.len()), world, ("input", n)) {
            return Err(length_error(self.rank, op, msg));
        }
        for (dst, d) in output.chunks_mut(n.max(1)).zip(&all) {
            dst.copy_from_slice(f32s(d));
        }
        Ok(())
    }

    fn broadcast(&mut self, data: &mut [u8], root: usize) -> CommResult<()> {
        let op = "broadcast";
        if root >= self.shared.world {
            // Every rank sees the same root, so every rank fails here alike.
            return Err(length_error(
                self.rank,
                op,
                format!("root {root} of a world of {}", self.shared.world),
            ));
        }
        let payload = if self.rank == root {
            Payload::Bytes(data.to_vec())
        } else {
            Payload::None
        };
        let all = self.exchange(Deposit {
            op,
            lens: (data.len(), root),
            data: payload,
        })?;
        if let Payload::Bytes(b) = &all[root].data {
            data.copy_from_slice(b);
        }
        Ok(())
    }

    fn barrier(&mut self) -> CommResult<()> {
        self.exchange(Deposit {
            op: "barrier",
            lens: (0, 0),
            data: Payload::None,
        })
        .map(|_| ())
    }
}
